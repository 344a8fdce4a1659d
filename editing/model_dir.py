"""Writing a model directory that is the same bytes under every transformers release.

``save_pretrained`` stamps ``"transformers_version"`` into ``config.json`` and
``generation_config.json``. For a DVC stage's output that stamp is a change of the
output whenever the library's patch release differs (same weights, new hash in
``dvc.lock``), so the project's model-building stages save through
:func:`save_model_dir`, which drops it. Loading does not need it.
"""
from __future__ import annotations

import json
from pathlib import Path

VERSION_STAMP = "transformers_version"
STAMPED_FILES = ("config.json", "generation_config.json")


def save_model_dir(model, tokenizer, out_dir: str | Path) -> Path:
    """``model`` (safetensors) and ``tokenizer`` saved to ``out_dir`` without the library's version stamp."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in STAMPED_FILES:
        path = out / name
        if not path.exists():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.pop(VERSION_STAMP, None) is not None:
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out

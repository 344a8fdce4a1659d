"""Where the deletion editor's statistics corpus comes from: a user's corpus file, or the training sources
of a project model known offline."""
from __future__ import annotations

import json
from pathlib import Path

from editing.errors import EditopsError

# Project models whose training sources are the default statistics corpus (catalog name -> file).
TRAINING_SOURCES = {"translator-marian": "data/translation/train.jsonl"}


def read_corpus_file(path: str | Path) -> list[str]:
    """Texts of a statistics corpus file: one per line, or JSONL with a ``source``/``text``/``sentence``/
    ``prompt`` field."""
    p = Path(path)
    if not p.is_file():
        raise EditopsError(f"statistics corpus file {p} does not exist; give a text file (one sentence per line) "
                           "or a JSONL file with a 'source' or 'text' field")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
                line = next((str(rec[k]) for k in ("source", "text", "sentence", "prompt") if rec.get(k)), "")
            except json.JSONDecodeError:
                pass
        if line:
            out.append(line)
    return out


def training_corpus_for(model) -> Path | None:
    """The training-sources file of a project model (:data:`TRAINING_SOURCES`), if the model was loaded
    from that model's directory and the file exists; else None."""
    from editing import catalog

    src = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not src or not Path(src).is_dir():
        return None
    here = Path(src).resolve()
    root = catalog.project_root(here)
    for name, rel in TRAINING_SOURCES.items():
        entry = catalog.CATALOG.get(name)
        if entry is not None and entry.model_path(root).resolve() == here:
            path = catalog.resolve(rel, root)
            return path if path.is_file() else None
    return None

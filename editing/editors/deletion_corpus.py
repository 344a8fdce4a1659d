"""The training sources of the project models known offline: the deletion editor's default statistics corpus
for them (a user's own corpus file is read by :func:`editing.formats.read_texts`)."""
from __future__ import annotations

from pathlib import Path

# Project models whose training sources are the default statistics corpus (catalog name -> file).
TRAINING_SOURCES = {"translator-marian": "data/translation/train.jsonl"}


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

"""Editors by name: one mapping from the name a user types to the class that edits.

``get_editor("nse", **hyperparameters)`` builds one. Classes are imported lazily so
``import editing`` stays light.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from editing.editors.base import EditorState, EditResult, Editor, RequestDiagnostics
from editing.errors import EditopsError, HyperparameterError

EDITORS: dict[str, str] = {
    "memit": "editing.editors.memit:MemitEditor",
    "nse": "editing.editors.sequential:SequentialEditor",
    "ft": "editing.editors.finetune:FineTuneEditor",
    "hook": "editing.editors.hook:HookEditor",
    "rank-one": "editing.editors.deletion:RankOneDeletionEditor",
}

DEFAULT_FACT_EDITOR = "nse"
DEFAULT_DELETION_EDITOR = "rank-one"


def get_editor(name: str, **hyperparameters: Any) -> Editor:
    if name not in EDITORS:
        raise EditopsError(f"unknown editor {name!r}; choose one of {', '.join(EDITORS)}")
    module, cls = EDITORS[name].split(":")
    try:
        return getattr(import_module(module), cls)(**hyperparameters)
    except TypeError as exc:
        raise HyperparameterError(f"editor {name!r} rejected the hyperparameters {sorted(hyperparameters)}: {exc}") from exc


__all__ = ["EDITORS", "Editor", "EditorState", "EditResult", "RequestDiagnostics", "get_editor",
           "DEFAULT_FACT_EDITOR", "DEFAULT_DELETION_EDITOR"]

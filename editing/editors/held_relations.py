"""Holding a request list's relations from the first batch on (``relation_prompts``).

An editor that holds an edited subject's other facts (``other_prompts``) draws those prompts
from the relations it knows: ``relation_prompts`` and the prompts its state has edited so far.
A run that knows its whole request list (a request file, a pipeline line's queue) names every
prompt of that list, so a subject's relations are held before the run first edits them.
"""
from __future__ import annotations

from typing import Any, Sequence

from editing.editors import Editor, get_editor
from editing.errors import HyperparameterError


def settings_of(editor: Editor, model) -> dict[str, Any] | None:
    """The hyperparameters an edit of ``model`` starts from (the model's preset applied), for editors that have
    them (``settings_for``); ``None`` for the others."""
    settings_for = getattr(editor, "settings_for", None)
    return settings_for(model).to_dict() if settings_for is not None else None


def with_relations_held(name: str, editor: Editor, hyperparameters: dict[str, Any], requests: Sequence, model,
                        hold: bool | None = None) -> Editor:
    """``editor`` (built as ``get_editor(name, **hyperparameters)``), rebuilt with ``relation_prompts`` = the
    given ones and then every prompt of ``requests``, where it holds a subject's other facts (``other_prompts``,
    given or from ``model``'s preset).

    ``hold`` is the user's ``hold_relations``: ``None`` (not given) holds them where it applies, ``False`` returns
    ``editor`` as it is, ``True`` where the editor holds no other prompts is a ``HyperparameterError`` (nothing
    would hold them); elsewhere an editor that holds none is returned as it is."""
    from editing.editors.siblings import relation_prompts_of

    if hold is False:
        return editor
    settings = settings_of(editor, model)
    if not settings or not settings.get("other_prompts"):
        if hold:
            raise HyperparameterError(f"hold_relations holds the requests' prompts where the editor holds a subject's "
                                      f"other facts; {name!r} holds none here: set other_prompts ≥ 1")
        return editor
    known = relation_prompts_of(requests, hyperparameters.get("relation_prompts"))
    return get_editor(name, **{**hyperparameters, "relation_prompts": known})

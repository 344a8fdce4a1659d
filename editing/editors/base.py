"""The one editor interface: ``edit(model, tokenizer, requests, state) -> EditResult``.

Contract every editor keeps:
- ``edit`` returns the model exactly as it found it (bit-for-bit): the change is
  in ``result.delta``, which the caller applies (``result.delta.apply(model)``).
- ``state`` is the editor's sequential state from the previous batch (``None`` for
  the first batch); ``result.state`` is the state after this batch. Its size is
  fixed per edited layer, whatever the number of earlier edits.
- ``result.diagnostics`` has one entry per request, saying whether the edit took.
  An edit that did not take is reported there, never silently accepted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from editing.delta import LowRankDelta
from editing.errors import StateError


@dataclass
class RequestDiagnostics:
    """How one request's edit went."""

    request_id: str
    succeeded: bool
    value_loss: float | None = None
    residual_norm: float | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EditorState:
    """Sequential state of an editor: named tensors of fixed size per layer plus JSON metadata.

    Each editor decides what its tensors mean (e.g. ``"<weight>::C_edits"``); the
    registry stores a state without knowing the editor.
    """

    editor: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, path: str | Path) -> None:
        """Write the state as safetensors. An exactly symmetric square tensor (``C_edits``, ``C0``) is stored as
        its upper triangle, row by row (half the bytes), and listed in the ``packed_symmetric`` metadata;
        :meth:`load` restores it bit for bit."""
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors, packed = {}, []
        for k, v in self.tensors.items():
            t = v.detach().contiguous().cpu()
            if t.dim() == 2 and t.shape[0] == t.shape[1] > 1 and torch.equal(t, t.T):
                packed.append(k)
                t = t[_upper(t.shape[0])]
            tensors[k] = t
        save_file(tensors, str(path), metadata={"editor": self.editor, "meta": json.dumps(self.meta, default=str),
                                                "packed_symmetric": json.dumps(packed)})

    @classmethod
    def load(cls, path: str | Path, editor: str | None = None) -> "EditorState":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            for k in json.loads(meta.get("packed_symmetric", "[]")):
                tensors[k] = _unpack_symmetric(tensors[k])
        except Exception as exc:
            raise StateError(f"cannot read editor state {path}: {exc}") from exc
        if editor is not None and meta.get("editor") != editor:
            raise StateError(f"state {path} belongs to editor {meta.get('editor')!r}, not {editor!r}")
        return cls(editor=meta.get("editor", ""), tensors=tensors, meta=json.loads(meta.get("meta", "{}")))


def _upper(n: int) -> torch.Tensor:
    """Mask of the upper triangle (diagonal included) of an ``n × n`` matrix."""
    return torch.ones(n, n, dtype=torch.bool).triu()


def _unpack_symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle, row by row, is ``upper`` (``n (n + 1) / 2`` values)."""
    n = int(round(((8 * upper.numel() + 1) ** 0.5 - 1) / 2))
    if upper.dim() != 1 or n * (n + 1) // 2 != upper.numel():
        raise StateError(f"a packed symmetric tensor holds {upper.numel()} values, not n (n + 1) / 2 for any n")
    mask = _upper(n)
    full = upper.new_zeros(n, n)
    full[mask] = upper
    return torch.where(mask, full, full.T)


@dataclass
class EditResult:
    """What one batch's edit produced."""

    delta: LowRankDelta
    state: EditorState | None
    diagnostics: list[RequestDiagnostics]

    @property
    def failed(self) -> list[RequestDiagnostics]:
        return [d for d in self.diagnostics if not d.succeeded]

    @property
    def all_succeeded(self) -> bool:
        return not self.failed


@runtime_checkable
class Editor(Protocol):
    """Anything with a ``name``, its ``hyperparameters`` and ``edit``."""

    name: str

    @property
    def hyperparameters(self) -> dict[str, Any]: ...

    def edit(self, model: nn.Module, tokenizer, requests: Sequence, state: EditorState | None = None) -> EditResult: ...

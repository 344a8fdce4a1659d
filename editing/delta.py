"""Low-rank weight deltas: the unit every editor produces and the registry stores.

A ``LowRankDelta`` holds, per edited weight, factors ``U (d_out x r)`` and
``V (d_in x r)`` with ``ΔW = U Vᵀ`` in the ``(d_out, d_in)`` orientation (GPT-2's
transposed ``Conv1D`` is handled when applying). ``kind == "weight"`` deltas are
added to the weights; ``kind == "hook"`` deltas are installed as gated hook
modules by :mod:`editing.editors.hook` (their gating tensors ride in ``extras``).

File format (safetensors): tensors ``"<weight>::U"``, ``"<weight>::V"`` and
``"extra::<name>"``; metadata key ``"editops"`` holds JSON with base fingerprint,
weight names, shapes, dtype, editor, hyperparameters, request ids and a sha256
over the tensors and the rest of the metadata, checked on every load.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from editing.arch import add_to_weight, get_module
from editing.errors import DeltaError, FingerprintMismatchError, IntegrityError

FORMAT_VERSION = 1


def _module_name(weight_name: str) -> str:
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


@dataclass
class LowRankDelta:
    """``ΔW_name = U_name V_nameᵀ`` for each edited weight, plus provenance."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_fingerprint: str = ""
    editor: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)
    kind: str = "weight"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (u, v) in self.factors.items():
            if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
                raise DeltaError(
                    f"{name}: factors must be U (d_out x r) and V (d_in x r), got {tuple(u.shape)} and {tuple(v.shape)}"
                )

    # ------------------------------------------------------------------ algebra
    @property
    def weight_names(self) -> list[str]:
        return sorted(self.factors)

    def rank(self, name: str) -> int:
        return int(self.factors[name][0].shape[1])

    def shape(self, name: str) -> tuple[int, int]:
        u, v = self.factors[name]
        return int(u.shape[0]), int(v.shape[0])

    def dense(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``U Vᵀ`` as a dense ``(d_out, d_in)`` matrix."""
        u, v = self.factors[name]
        return u.to(dtype) @ v.to(dtype).T

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each ``ΔW`` computed from the factors (no dense matrix)."""
        out = {}
        for name, (u, v) in self.factors.items():
            u64, v64 = u.double(), v.double()
            out[name] = float(torch.sqrt(torch.clamp(((u64.T @ u64) * (v64.T @ v64)).sum(), min=0.0)))
        return out

    def nbytes(self) -> int:
        return sum(u.numel() * u.element_size() + v.numel() * v.element_size() for u, v in self.factors.values()) + sum(
            t.numel() * t.element_size() for t in self.extras.values()
        )

    def compose(self, other: "LowRankDelta") -> "LowRankDelta":
        """``self + other`` (factors concatenated: ranks add, nothing is lost)."""
        if self.kind != other.kind:
            raise DeltaError(f"cannot compose a {self.kind!r} delta with a {other.kind!r} delta")
        if self.base_fingerprint and other.base_fingerprint and self.base_fingerprint != other.base_fingerprint:
            raise FingerprintMismatchError("cannot compose deltas computed for different base models")
        factors = dict(self.factors)
        for name, (u, v) in other.factors.items():
            if name in factors:
                u0, v0 = factors[name]
                factors[name] = (torch.cat([u0, u.to(u0.dtype)], 1), torch.cat([v0, v.to(v0.dtype)], 1))
            else:
                factors[name] = (u, v)
        return replace(
            self,
            factors=factors,
            base_fingerprint=self.base_fingerprint or other.base_fingerprint,
            editor=self.editor if self.editor == other.editor else f"{self.editor}+{other.editor}",
            request_ids=[*self.request_ids, *other.request_ids],
            extras={**self.extras, **other.extras},
            meta={**self.meta, **other.meta},
        )

    @staticmethod
    def sum(deltas: Iterable["LowRankDelta"]) -> "LowRankDelta":
        deltas = list(deltas)
        if not deltas:
            raise DeltaError("no deltas to sum")
        out = deltas[0]
        for d in deltas[1:]:
            out = out.compose(d)
        return out

    def compact(self, rank: int | None = None, rtol: float = 1e-6) -> "LowRankDelta":
        """Re-factor each ``ΔW`` by truncated SVD to at most ``rank`` (default: numerical rank).

        Uses QR of the factors so the SVD is of an ``r x r`` core, never of the dense
        matrix: ``U = Q_u R_u``, ``V = Q_v R_v``, ``R_u R_vᵀ = A S Bᵀ`` →
        ``U' = Q_u A S``, ``V' = Q_v B``.
        """
        factors = {}
        for name, (u, v) in self.factors.items():
            qu, ru = torch.linalg.qr(u.double())
            qv, rv = torch.linalg.qr(v.double())
            a, s, bt = torch.linalg.svd(ru @ rv.T)
            keep = int((s > rtol * (s[0] if s.numel() else 0)).sum())
            if rank is not None:
                keep = min(keep, rank)
            keep = max(keep, 1)
            factors[name] = ((qu @ a[:, :keep] * s[:keep]).to(u.dtype), (qv @ bt[:keep].T).to(v.dtype))
        return replace(self, factors=factors, meta={**self.meta, "compacted_rank": rank})

    def negate(self) -> "LowRankDelta":
        return replace(self, factors={n: (-u, v) for n, (u, v) in self.factors.items()})

    # ------------------------------------------------------------ model surgery
    @torch.no_grad()
    def apply(self, model: nn.Module, alpha: float = 1.0) -> None:
        """Add ``alpha · U Vᵀ`` to each weight (hook deltas: install/extend the hooks)."""
        if self.kind == "hook":
            from editing.editors.hook import apply_hook_delta

            apply_hook_delta(model, self, alpha)
            return
        if self.kind != "weight":
            raise DeltaError(f"unknown delta kind {self.kind!r}")
        for name, (u, v) in self.factors.items():
            module = get_module(model, _module_name(name))
            w = module.weight
            d_out, d_in = self.shape(name)
            expected = (d_in, d_out) if type(module).__name__ == "Conv1D" else (d_out, d_in)
            if tuple(w.shape) != expected:
                raise DeltaError(f"{name}: delta is {d_out}x{d_in} but the model's weight is {tuple(w.shape)}")
            add_to_weight(module, alpha * self.dense(name, torch.float64))

    def remove(self, model: nn.Module) -> None:
        """Undo :meth:`apply` (exact to float rounding of one add and one subtract)."""
        self.apply(model, alpha=-1.0)

    def check_base(self, fingerprint: str) -> None:
        """Raise :class:`FingerprintMismatchError` unless this delta was made for ``fingerprint``."""
        if self.base_fingerprint and fingerprint and self.base_fingerprint != fingerprint:
            raise FingerprintMismatchError(
                f"delta was computed for base model {self.base_fingerprint[:12]}…, not {fingerprint[:12]}…; "
                "materialise it on the base model it was made for"
            )

    # ------------------------------------------------------------- persistence
    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, (u, v) in self.factors.items():
            out[f"{name}::U"] = u.detach().contiguous().cpu()
            out[f"{name}::V"] = v.detach().contiguous().cpu()
        for name, t in self.extras.items():
            out[f"extra::{name}"] = t.detach().contiguous().cpu()
        return out

    def _header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "base_fingerprint": self.base_fingerprint,
            "editor": self.editor,
            "hyperparameters": self.hyperparameters,
            "request_ids": list(self.request_ids),
            "weights": {n: {"shape": list(self.shape(n)), "rank": self.rank(n), "dtype": str(self.factors[n][0].dtype)}
                        for n in self.weight_names},
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> str:
        """Write the delta as safetensors; returns the content sha256 stored in its metadata."""
        from safetensors.torch import save_file

        tensors = self._tensors()
        header = self._header()
        digest = content_sha256(tensors, header)
        header["sha256"] = digest
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"editops": json.dumps(header, sort_keys=True, default=str)})
        return digest

    @classmethod
    def load(cls, path: str | Path, expect_fingerprint: str | None = None) -> "LowRankDelta":
        """Read a delta, verifying its sha256 (and base fingerprint when given)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DeltaError(f"delta file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise DeltaError(f"{path} is not a readable safetensors delta: {exc}") from exc
        if "editops" not in meta:
            raise DeltaError(f"{path} has no editops metadata; it was not written by LowRankDelta.save")
        try:
            header = json.loads(meta["editops"])
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{path}: metadata is not valid JSON ({exc})") from exc
        stored = header.pop("sha256", None)
        actual = content_sha256(tensors, header)
        if stored != actual:
            raise IntegrityError(
                f"{path}: content sha256 {actual[:12]}… does not match the stored {str(stored)[:12]}…; "
                "the file was modified or corrupted after it was written"
            )
        factors = {}
        for name in header["weights"]:
            factors[name] = (tensors[f"{name}::U"], tensors[f"{name}::V"])
        extras = {k[len("extra::"):]: t for k, t in tensors.items() if k.startswith("extra::")}
        delta = cls(
            factors=factors,
            base_fingerprint=header["base_fingerprint"],
            editor=header["editor"],
            hyperparameters=header["hyperparameters"],
            request_ids=header["request_ids"],
            kind=header["kind"],
            extras=extras,
            meta=header.get("meta", {}),
        )
        if expect_fingerprint is not None:
            delta.check_base(expect_fingerprint)
        return delta


def content_sha256(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> str:
    """sha256 over the header JSON (sorted keys) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

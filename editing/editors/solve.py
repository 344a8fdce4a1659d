"""Closed-form weight updates, as pure functions returning low-rank factors.

Notation (row convention, as the rest of editops): ``K`` is ``(n, d_in)`` (one key
per row), ``R`` is ``(n, d_out)`` (the residual each key's output must gain),
``C0`` and ``C_edits`` are ``(d_in, d_in)``. Every function returns ``(U, V)``
with ``U (d_out × n)``, ``V (d_in × n)`` and ``ΔW = U Vᵀ`` in the ``(d_out, d_in)``
orientation, so the rank is at most the batch size ``n``. Computed in float64, on the device of ``K``.

- MEMIT: ``ΔW = Rᵀ K (λ C0 + C_edits + KᵀK)⁻¹``  →  ``U = Rᵀ``, ``V = A⁻¹ Kᵀ`` with
  ``A = λ C0 + C_edits + KᵀK`` (symmetric). With ``C_edits = Σ`` earlier batches'
  ``KᵀK`` this is sequential MEMIT: earlier keys are held in place by the regulariser.
- AlphaEdit: with ``P`` the projector onto the (near-)null space of ``C0``,
  ``ΔW = Rᵀ K P M⁻ᵀ``, ``M = P (KᵀK + C_edits) + α I``  →  ``U = Rᵀ``, ``V = M⁻¹ P Kᵀ``.
  Then ``ΔW k ≈ 0`` for keys in the span of ``C0``'s large eigen-directions.
- Extra keys (``K_x``, weight ``w``): a second key per request fitted to the same residual,
  ``min Σ‖ΔW k_i − r_i‖² + w Σ‖ΔW x_i − r_i‖² + tr(ΔW (λC0 + C_edits) ΔWᵀ)``, gives
  ``ΔW = Rᵀ (K + w K_x) (λ C0 + C_edits + KᵀK + w K_xᵀK_x)⁻¹``: still ``U = Rᵀ``, rank ≤ ``n``.
  Several sets ``K_x1, K_x2, …`` (each one row per request) enter as ``Σ_j K_xj`` and ``Σ_j K_xjᵀK_xj``.
- Neuron restriction (NSE): only the columns ``S`` of ``W_out`` (the neurons with the
  largest ``Σ|k|`` over the batch) are updated: the solve above is done on the
  ``S × S`` blocks of every matrix and ``V`` is zero outside ``S``.
"""
from __future__ import annotations

from typing import Sequence

import torch

# extra keys per request fitted to the same residual: one (n, d_in) tensor, or several (summed in the solve)
ExtraKeys = torch.Tensor | Sequence[torch.Tensor] | None


def _sym_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for symmetric positive (semi)definite ``a`` (Cholesky, falling back to LU/lstsq)."""
    try:
        l, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(b, l)
    except RuntimeError:
        pass
    try:
        return torch.linalg.solve(a, b)
    except RuntimeError:
        return torch.linalg.lstsq(a, b).solution


def _with_extra(Ks: torch.Tensor, K_extra: ExtraKeys, idx, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(KᵀK + w Σ_j X_jᵀX_j, (K + w Σ_j X_j)ᵀ)`` on the selected columns (no extra keys: ``(KᵀK, Kᵀ)``)."""
    if K_extra is None or not w:
        return Ks.T @ Ks, Ks.T
    a, rhs = Ks.T @ Ks, Ks.clone()
    for X in ([K_extra] if isinstance(K_extra, torch.Tensor) else K_extra):
        X = X.double()
        X = X[:, idx] if idx is not None else X
        a = a + w * (X.T @ X)
        rhs = rhs + w * X
    return a, rhs.T


def memit_factors(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor | None, lam: float,
                  C_edits: torch.Tensor | None = None, neurons: torch.Tensor | None = None,
                  ridge: float = 1e-6, K_extra: ExtraKeys = None,
                  extra_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's ``ΔW = Rᵀ K (λ C0 + C_edits + KᵀK)⁻¹`` as ``(U, V)``; ``neurons`` restricts to columns ``S``;
    ``K_extra`` (one row per request, or several such sets) adds keys per request with weight ``extra_weight``.

    ``ridge`` (relative to the mean diagonal) keeps ``A`` invertible when ``C0`` is
    rank-deficient.
    """
    K64, R64 = K.double(), R.double()
    d_in = K64.shape[1]
    idx = neurons if neurons is not None else None
    Ks = K64[:, idx] if idx is not None else K64
    a, rhs = _with_extra(Ks, K_extra, idx, extra_weight)
    if C0 is not None and lam:
        c0 = C0.double()
        a = a + lam * (c0[idx][:, idx] if idx is not None else c0)
    if C_edits is not None:
        ce = C_edits.double()
        a = a + (ce[idx][:, idx] if idx is not None else ce)
    scale = float(a.diagonal().mean()) if a.numel() else 1.0
    a = a + ridge * max(scale, 1e-12) * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    vs = _sym_solve(a, rhs)
    if idx is not None:
        v = torch.zeros((d_in, K64.shape[0]), dtype=torch.float64, device=vs.device)
        v[idx] = vs
    else:
        v = vs
    return R64.T.contiguous(), v


def psd_part(C: torch.Tensor) -> torch.Tensor:
    """The positive semi-definite part of a symmetric ``C``: ``V max(Λ, 0) Vᵀ`` for ``C = V Λ Vᵀ`` (the nearest
    PSD matrix in Frobenius norm), in ``C``'s dtype."""
    sym = (C + C.T) / 2
    lam, V = torch.linalg.eigh(sym.double())
    return ((V * lam.clamp(min=0)) @ V.T).to(C.dtype)


def nullspace_projector(C0: torch.Tensor, threshold: float = 2e-2, relative: bool = True,
                        min_dim: int = 0) -> tuple[torch.Tensor, int]:
    """``P = Û Ûᵀ`` over the eigen-directions of ``C0`` with eigenvalue ``< threshold``.

    ``relative=True`` compares with ``threshold · λ_max`` (scale-free: key norms
    differ between models); AlphaEdit's absolute ``2e-2`` is ``relative=False``.
    At least ``min_dim`` directions (the smallest) are kept so an edit remains
    possible on a model whose ``C0`` is full rank. Returns ``(P, dim)``.
    """
    evals, evecs = torch.linalg.eigh(C0.double())
    cut = threshold * float(evals.max()) if relative else threshold
    keep = evals < cut
    if int(keep.sum()) < min_dim:
        keep = torch.zeros_like(keep)
        keep[: min_dim] = True  # eigh sorts ascending
    u = evecs[:, keep]
    return u @ u.T, int(keep.sum())


def alphaedit_factors(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, C_edits: torch.Tensor | None = None,
                      alpha: float = 1.0, neurons: torch.Tensor | None = None, K_extra: ExtraKeys = None,
                      extra_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's null-space-projected update ``ΔW = Rᵀ K P M⁻ᵀ``, ``M = P(KᵀK + C_edits) + αI``
    (with ``K_extra``: ``K → K + w K_x`` on the right, ``KᵀK → KᵀK + w K_xᵀK_x`` in ``M``)."""
    K64, R64 = K.double(), R.double()
    d_in = K64.shape[1]
    idx = neurons
    Ks = K64[:, idx] if idx is not None else K64
    p = P.double()
    if idx is not None:
        p = p[idx][:, idx]
    a, rhs = _with_extra(Ks, K_extra, idx, extra_weight)
    if C_edits is not None:
        ce = C_edits.double()
        a = a + (ce[idx][:, idx] if idx is not None else ce)
    m = p @ a + alpha * torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
    vs = torch.linalg.solve(m, p @ rhs)
    if idx is not None:
        v = torch.zeros((d_in, K64.shape[0]), dtype=torch.float64, device=vs.device)
        v[idx] = vs
    else:
        v = vs
    return R64.T.contiguous(), v


def responsible_neurons(K: torch.Tensor, share: float = 0.8, min_count: int = 1) -> torch.Tensor:
    """Indices ``S`` of the neurons (key dimensions) with the largest ``Σ|k|`` over the batch,
    the smallest set whose cumulative share of ``Σ|k|`` reaches ``share`` (NSE's selection)."""
    score = K.double().abs().sum(0)
    order = torch.argsort(score, descending=True)
    cum = torch.cumsum(score[order], 0) / score.sum().clamp(min=1e-30)
    count = int((cum < share).sum()) + 1
    count = max(min(count, K.shape[1]), min(min_count, K.shape[1]))
    return torch.sort(order[:count]).values


def residual_norms(K: torch.Tensor, R: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``‖R_i − ΔW k_i‖`` per row: what the update leaves of each key's residual (linear estimate)."""
    dw_k = (K.double() @ V.double()) @ U.double().T
    return (R.double() - dw_k).norm(dim=1)

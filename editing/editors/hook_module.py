"""Gated hook layers (CoachHooK style): the original ``W_out`` stays frozen, a hook adds ``ΔW x`` per token.

At an edited layer the MLP output projection ``W_out`` (``nn.Linear`` or GPT-2's
``Conv1D``) keeps its weights. A :class:`HookLayer` attached to it holds a
low-rank ``ΔW = U Vᵀ`` (``U`` d_out×r, ``V`` d_in×r; r grows by the batch size
with every batch) and rewrites the projection's output per token::

    y_t = W0 x_t + ΔW x_t   if z_t ≥ α      (the hook *fires* at position t)
    y_t = W0 x_t            otherwise       (bit-for-bit the original output)

where ``d_t = ‖ΔW x_t‖`` and ``z_t`` is a z-score of ``d_t`` across the valid
(non-padding) positions of the same sequence.

**The z-score** (choice documented here). ``z_t = (d_t − μ_t) / σ_t`` with ``μ_t``,
``σ_t`` the mean and standard deviation of the *other* valid positions of the
sequence pooled with ``n0`` pseudo-positions drawn from a reference distribution
``(μ_ref, σ_ref)`` (the deviation norms ``‖ΔW k‖`` over keys of general text,
stored with the hook)::

    n' = (n − 1) + n0
    μ_t = (Σ_{s≠t} d_s + n0 μ_ref) / n'
    σ_t² = (Σ_{s≠t} d_s² + n0 (σ_ref² + μ_ref²)) / n' − μ_t²

Leaving ``d_t`` out keeps an outlier from inflating its own scale (with the plain
z-score one outlier among n positions can never exceed ``√(n−1)``, so a 5-token
prompt could never reach α = 2.2), and the reference pseudo-positions make
**length-1 sequences** (e.g. each step of cached generation) well defined: there
``z = (d − μ_ref) / σ_ref``. ``n0 = 0`` gives the leave-one-out z-score of the
sequence alone. Padding is excluded using the ``attention_mask`` the model was
called with (captured by a forward pre-hook on the top-level model; the last T
columns of the mask belong to the T positions being computed).

**Reference gate** (``ref_gate``, on by default): a position fires only if it is
also an outlier against general text, ``(d_t − μ_ref) / σ_ref ≥ α``, where
``(μ_ref, σ_ref)`` are the mean and standard deviation of ``‖ΔW k‖`` over keys of
general text (the editor's reference corpus). In a short sequence the largest of a
handful of ordinary deviations easily reaches a z-score of 2, so without this
condition the hook fires on some word of most unrelated sentences.

**α** per layer starts at ``alpha0`` (2.2) and after each batch becomes
``min(α_prev, margin · min_z)`` where ``min_z`` is the smallest z-score at the
edited token over every tracked edit prompt (this batch's and earlier ones),
floored at ``alpha_min``; see :mod:`editing.editors.hook`.

A hook is a stack of *segments* (one per applied batch delta): ``(U_i, V_i, α_i,
μ_ref_i, σ_ref_i)``. The gate uses the newest segment's ``α, μ_ref, σ_ref``
(they describe the whole ``ΔW`` after that batch). Removing a delta drops its
columns (no subtraction: removal is exact) and its gating entry; a hook whose
rank reaches zero is uninstalled, and with no hook left the model is exactly the
base model again.

The hook tensors are non-persistent buffers of a child module of the projection,
so ``state_dict()`` (and :func:`editing.models.fingerprint`) are those of the
base model; :func:`save_hooks` writes the hooks to safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from editing.arch import get_module, is_transposed
from editing.errors import DeltaError

HOOK_ATTR = "editops_hook"  # child-module name under the wrapped projection
_HOOKSET_ATTR = "_editops_hookset"


@dataclass
class Segment:
    """One applied batch delta inside a hook."""

    u: torch.Tensor  # d_out x r
    v: torch.Tensor  # d_in x r
    alpha: float
    ref_mean: float
    ref_std: float
    tag: str = ""


class _Context:
    """Per-forward information shared by the hooks of one model (the attention mask)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.force: bool = False  # fire everywhere (used while computing an edit)
        self.record: bool = False


class HookLayer(nn.Module):
    """The gated low-rank hook of one projection (see the module docstring for the rule)."""

    def __init__(self, d_in: int, d_out: int, n0: float = 4.0, context: _Context | None = None,
                 ref_gate: bool = True) -> None:
        super().__init__()
        self.d_in, self.d_out, self.n0, self.ref_gate = d_in, d_out, float(n0), bool(ref_gate)
        self.segments: list[Segment] = []
        self.context = context or _Context()
        self.register_buffer("U", torch.zeros(d_out, 0), persistent=False)
        self.register_buffer("V", torch.zeros(d_in, 0), persistent=False)
        self.last_fired: torch.Tensor | None = None  # (B, T) bool, when context.record
        self.last_valid: torch.Tensor | None = None
        self._handle = None

    # ----------------------------------------------------------- segments
    @property
    def rank(self) -> int:
        return int(self.V.shape[1])

    @property
    def alpha(self) -> float:
        return self.segments[-1].alpha if self.segments else float("inf")

    @property
    def ref(self) -> tuple[float, float]:
        s = self.segments[-1] if self.segments else None
        return (s.ref_mean, s.ref_std) if s else (0.0, 1.0)

    def _rebuild(self) -> None:
        dev, dt = self.U.device, self.U.dtype
        if self.segments:
            self.U = torch.cat([s.u for s in self.segments], 1).to(dev, dt)
            self.V = torch.cat([s.v for s in self.segments], 1).to(dev, dt)
        else:
            self.U = torch.zeros(self.d_out, 0, device=dev, dtype=dt)
            self.V = torch.zeros(self.d_in, 0, device=dev, dtype=dt)

    def push(self, seg: Segment) -> None:
        if seg.u.shape[0] != self.d_out or seg.v.shape[0] != self.d_in:
            raise DeltaError(
                f"hook delta is {seg.u.shape[0]}x{seg.v.shape[0]} but the projection is {self.d_out}x{self.d_in}"
            )
        self.segments.append(seg)
        self._rebuild()

    def pop_matching(self, u: torch.Tensor, v: torch.Tensor) -> Segment:
        """Remove the (newest) segment whose factors equal ``(u, v)``; :class:`DeltaError` if none does."""
        for i in range(len(self.segments) - 1, -1, -1):
            s = self.segments[i]
            if s.u.shape == u.shape and s.v.shape == v.shape and torch.equal(s.v, v.to(s.v)) and torch.equal(s.u, u.to(s.u)):
                seg = self.segments.pop(i)
                self._rebuild()
                return seg
        raise DeltaError("this hook delta is not installed on the model (no hook segment has its factors); "
                         "remove only deltas that were applied")

    # ----------------------------------------------------------- gating
    def deviation(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW x`` for inputs ``x`` (..., d_in) → (..., d_out)."""
        v = self.V.to(x.dtype)
        u = self.U.to(x.dtype)
        return (x @ v) @ u.T

    def zscores(self, d: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Leave-one-out z-scores of norms ``d`` (B, T) over ``valid`` positions, pooled with the reference."""
        d = d.float()
        w = valid.to(d.device).float()
        dm = d * w
        s1 = dm.sum(-1, keepdim=True)
        s2 = (dm * d).sum(-1, keepdim=True)
        n = w.sum(-1, keepdim=True)
        mu_r, sd_r = self.ref
        n0 = self.n0
        n_other = (n - w) + n0  # positions other than t (a padded t is not counted in n anyway)
        s1_o = s1 - dm + n0 * mu_r
        s2_o = s2 - dm * d + n0 * (sd_r ** 2 + mu_r ** 2)
        mean = s1_o / n_other.clamp(min=1e-12)
        var = s2_o / n_other.clamp(min=1e-12) - mean ** 2
        floor = max(1e-6 * max(abs(mu_r), sd_r), 1e-12)
        std = var.clamp(min=floor ** 2).sqrt()
        z = (d - mean) / std
        # n_other == 0 (one valid position and no reference): cannot judge -> never fires
        return torch.where(n_other > 0, z, torch.full_like(z, float("-inf")))

    def scores(self, d: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The score compared with α: the sequence z-score, and with ``ref_gate`` the smaller of it and
        the reference z-score ``(d − μ_ref) / σ_ref`` (an outlier in its sequence AND against general text)."""
        z = self.zscores(d, valid)
        if self.ref_gate and self.segments:
            mu_r, sd_r = self.ref
            z = torch.minimum(z, (d.float() - mu_r) / max(sd_r, 1e-12))
        return z

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(deviation, fire mask, valid mask)`` for ``x`` of shape (B, T, d_in) or (T, d_in)."""
        squeeze = x.dim() == 2
        xb = x.unsqueeze(0) if squeeze else x
        dev = self.deviation(xb)
        b, t = xb.shape[0], xb.shape[1]
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device)
        mask = self.context.mask
        if mask is not None and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= t:
            valid = mask[:, -t:].to(device=x.device).bool()
        if self.context.force:
            fire = valid.clone()
        else:
            fire = (self.scores(dev.norm(dim=-1), valid) >= self.alpha) & valid
        if squeeze:
            return dev[0], fire[0], valid[0]
        return dev, fire, valid

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return base_out
        dev, fire, valid = self.gate(x)
        if self.context.record:
            self.last_fired, self.last_valid = fire.detach(), valid.detach()
        return torch.where(fire.unsqueeze(-1), base_out + dev.to(base_out.dtype), base_out)


def _forward_hook(module: nn.Module, args, output):
    hook: HookLayer = getattr(module, HOOK_ATTR)
    return hook(args[0], output)


@dataclass
class HookSet:
    """The hooks installed on one model, the shared context and the torch hook handles."""

    context: _Context
    layers: dict[str, HookLayer] = field(default_factory=dict)
    handles: list = field(default_factory=list)


def _pre(ctx: _Context):
    def pre(module, args, kwargs):
        mask = kwargs.get("attention_mask")  # passed by keyword by generate() and pipelines
        ctx.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None

    return pre


def _post(ctx: _Context):
    def post(module, args, output):
        ctx.mask = None
        return None

    return post


def hookset(model: nn.Module) -> HookSet | None:
    """The model's installed hooks, or ``None``."""
    return model.__dict__.get(_HOOKSET_ATTR)


def installed_hooks(model: nn.Module) -> dict[str, HookLayer]:
    """``{projection module name: HookLayer}`` (empty when none is installed)."""
    hs = hookset(model)
    return dict(hs.layers) if hs else {}


def ensure_hook(model: nn.Module, module_name: str, n0: float = 4.0, ref_gate: bool = True) -> HookLayer:
    """The hook of ``module_name``, installed (empty, rank 0) if absent."""
    hs = hookset(model)
    if hs is None:
        ctx = _Context()
        hs = HookSet(ctx)
        hs.handles.append(model.register_forward_pre_hook(_pre(ctx), with_kwargs=True))
        hs.handles.append(model.register_forward_hook(_post(ctx)))
        model.__dict__[_HOOKSET_ATTR] = hs
    if module_name in hs.layers:
        return hs.layers[module_name]
    proj = get_module(model, module_name)
    w = proj.weight
    d_in, d_out = (w.shape[0], w.shape[1]) if is_transposed(proj) else (w.shape[1], w.shape[0])
    layer = HookLayer(d_in, d_out, n0=n0, context=hs.context, ref_gate=ref_gate).to(device=w.device, dtype=w.dtype)
    proj.add_module(HOOK_ATTR, layer)
    layer._handle = proj.register_forward_hook(_forward_hook)
    hs.layers[module_name] = layer
    return layer


def uninstall_hook(model: nn.Module, module_name: str) -> None:
    """Remove one hook (and the model-level hooks with the last one)."""
    hs = hookset(model)
    if hs is None or module_name not in hs.layers:
        return
    layer = hs.layers.pop(module_name)
    if layer._handle is not None:
        layer._handle.remove()
    proj = get_module(model, module_name)
    delattr(proj, HOOK_ATTR)
    if not hs.layers:
        for h in hs.handles:
            h.remove()
        del model.__dict__[_HOOKSET_ATTR]


def uninstall_all(model: nn.Module) -> None:
    for name in list(installed_hooks(model)):
        uninstall_hook(model, name)


class forced_firing:
    """Context manager: every hook fires at every valid position (plain ungated ``W0 + ΔW``)."""

    def __init__(self, model: nn.Module) -> None:
        self.hs = hookset(model)

    def __enter__(self):
        if self.hs:
            self._prev = self.hs.context.force
            self.hs.context.force = True
        return self

    def __exit__(self, *exc):
        if self.hs:
            self.hs.context.force = self._prev
        return False

"""The hook-layer editor (CoachHooK style) and the functions that install, save and reload its hooks.

- :func:`apply_hook_delta` installs/extends/removes gated hooks from a ``LowRankDelta``
  of ``kind == "hook"`` (``LowRankDelta.apply`` calls it for hook deltas).
- :func:`save_hooks` / :func:`load_hooks` / :func:`load_hooked` persist the hooks of a
  model as one safetensors delta file (sha256-checked, tied to the base fingerprint).
- :func:`hook_firing_rate`: the share of valid tokens of some texts where any hook fires.
- :class:`HookEditor` (``hook`` in ``EDITORS``): see its docstring.

Delta layout of a hook delta: ``factors[w] = (U, V)`` for this batch at weight ``w``
(``"<projection>.weight"``), ``extras["<w>::alpha"]``, ``extras["<w>::ref_mean"]``,
``extras["<w>::ref_std"]`` (0-d float tensors: the gate of the whole hook after this
batch) and ``meta["n0"]`` (reference pseudo-positions of the z-score).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from editing.arch import get_module, in_out_features, uncached
from editing.delta import LowRankDelta
from editing.editors.hook_module import (
    HookLayer,
    Segment,
    ensure_hook,
    forced_firing,
    hookset,
    installed_hooks,
    uninstall_all,
    uninstall_hook,
)
from editing.errors import DeltaError

HOOKS_FILE = "hooks.safetensors"
DEFAULT_N0 = 4.0


def _module_name(weight_name: str) -> str:
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def _extra(delta: LowRankDelta, weight: str, key: str, default: float) -> float:
    t = delta.extras.get(f"{weight}::{key}")
    return float(t.reshape(-1)[0]) if t is not None else default


@torch.no_grad()
def apply_hook_delta(model: nn.Module, delta: LowRankDelta, alpha: float = 1.0) -> None:
    """Install ``delta``'s factors as gated hooks (``alpha > 0``) or remove them (``alpha < 0``).

    ``alpha = 1`` adds a segment ``(U, V)`` to the hook of each weight (installing the
    hook if absent) with the gate ``α, μ_ref, σ_ref`` from ``delta.extras``;
    ``alpha = -1`` drops the segment whose factors equal the delta's (exact: no
    subtraction), uninstalling a hook whose rank reaches zero. Other values scale
    ``U`` by ``|alpha|`` (apply) or look for a segment applied with that scale (remove).
    """
    if delta.kind != "hook":
        raise DeltaError(f"apply_hook_delta needs a hook delta, got kind {delta.kind!r}")
    if alpha == 0:
        return
    n0 = float(delta.meta.get("n0", DEFAULT_N0))
    ref_gate = bool(delta.meta.get("ref_gate", True))
    hooks = installed_hooks(model)
    if alpha < 0:
        missing = [w for w in delta.factors if _module_name(w) not in hooks]
        if missing:
            raise DeltaError(f"cannot remove hook delta: no hook installed at {', '.join(missing)}")
    if alpha > 0:  # check every shape before installing anything
        for weight, (u, v) in delta.factors.items():
            proj = get_module(model, _module_name(weight))
            d_in, d_out = in_out_features(proj)
            if (u.shape[0], v.shape[0]) != (d_out, d_in):
                raise DeltaError(f"{weight}: hook delta is {u.shape[0]}x{v.shape[0]} but the projection is "
                                 f"{d_out}x{d_in} (d_out x d_in); was the delta made for another model?")
    done: list[tuple[str, Segment]] = []
    try:
        for weight, (u, v) in delta.factors.items():
            name = _module_name(weight)
            if alpha > 0:
                layer = ensure_hook(model, name, n0=n0, ref_gate=ref_gate)
                seg = Segment(
                    u=(u * alpha if alpha != 1 else u).detach().clone(), v=v.detach().clone(),
                    alpha=_extra(delta, weight, "alpha", 2.2), ref_mean=_extra(delta, weight, "ref_mean", 0.0),
                    ref_std=_extra(delta, weight, "ref_std", 1.0), tag=",".join(delta.request_ids),
                )
                layer.push(seg)
                done.append((name, seg))
            else:
                layer = hooks[name]
                layer.pop_matching(u * (-alpha) if alpha != -1 else u, v)
                if layer.rank == 0:
                    uninstall_hook(model, name)
    except DeltaError:
        if alpha > 0:  # leave the model as it was
            for name, seg in done:
                layer = installed_hooks(model)[name]
                layer.pop_matching(seg.u, seg.v)
                if layer.rank == 0:
                    uninstall_hook(model, name)
        raise


def hooks_delta(model: nn.Module, base_fingerprint: str = "") -> LowRankDelta:
    """All hooks of ``model`` as one hook delta (segments concatenated; their ranks and gates in meta/extras)."""
    hooks = installed_hooks(model)
    if not hooks:
        raise DeltaError("the model has no hooks installed")
    factors, extras, segments = {}, {}, {}
    n0, ref_gate = DEFAULT_N0, True
    for name, layer in sorted(hooks.items()):
        w = f"{name}.weight"
        factors[w] = (layer.U.detach().cpu().clone(), layer.V.detach().cpu().clone())
        segs = layer.segments
        segments[w] = [int(s.v.shape[1]) for s in segs]
        extras[f"{w}::seg_alpha"] = torch.tensor([s.alpha for s in segs], dtype=torch.float64)
        extras[f"{w}::seg_ref_mean"] = torch.tensor([s.ref_mean for s in segs], dtype=torch.float64)
        extras[f"{w}::seg_ref_std"] = torch.tensor([s.ref_std for s in segs], dtype=torch.float64)
        extras[f"{w}::alpha"] = torch.tensor(layer.alpha, dtype=torch.float64)
        extras[f"{w}::ref_mean"] = torch.tensor(layer.ref[0], dtype=torch.float64)
        extras[f"{w}::ref_std"] = torch.tensor(layer.ref[1], dtype=torch.float64)
        n0, ref_gate = layer.n0, layer.ref_gate
    return LowRankDelta(factors=factors, base_fingerprint=base_fingerprint, editor="hook", kind="hook",
                        extras=extras, meta={"n0": n0, "ref_gate": ref_gate, "segments": segments,
                                             "segment_tags": {f"{n}.weight": [s.tag for s in l.segments]
                                                              for n, l in hooks.items()}})


def save_hooks(model: nn.Module, out_dir: str | Path, base_fingerprint: str | None = None) -> Path:
    """Write the model's hooks to ``out_dir/hooks.safetensors`` (sha256 + base fingerprint in metadata)."""
    if base_fingerprint is None:
        from editing.models import fingerprint

        base_fingerprint = fingerprint(model)
    path = Path(out_dir) / HOOKS_FILE
    hooks_delta(model, base_fingerprint).save(path)
    return path


@torch.no_grad()
def load_hooks(model: nn.Module, hooks_dir: str | Path, check_fingerprint: bool = True) -> dict[str, HookLayer]:
    """Install the hooks saved by :func:`save_hooks` on ``model`` (which must have no hooks yet)."""
    if installed_hooks(model):
        raise DeltaError("the model already has hooks installed; load hooks onto a plain base model")
    path = Path(hooks_dir)
    path = path / HOOKS_FILE if path.is_dir() else path
    expect = None
    if check_fingerprint:
        from editing.models import fingerprint

        expect = fingerprint(model)
    delta = LowRankDelta.load(path, expect_fingerprint=expect)
    if delta.kind != "hook" or "segments" not in delta.meta:
        raise DeltaError(f"{path} is not a hooks file written by save_hooks")
    n0 = float(delta.meta.get("n0", DEFAULT_N0))
    ref_gate = bool(delta.meta.get("ref_gate", True))
    tags = delta.meta.get("segment_tags", {})
    for w, (u, v) in delta.factors.items():
        layer = ensure_hook(model, _module_name(w), n0=n0, ref_gate=ref_gate)
        start = 0
        for i, r in enumerate(delta.meta["segments"][w]):
            layer.push(Segment(
                u=u[:, start:start + r].clone(), v=v[:, start:start + r].clone(),
                alpha=float(delta.extras[f"{w}::seg_alpha"][i]), ref_mean=float(delta.extras[f"{w}::seg_ref_mean"][i]),
                ref_std=float(delta.extras[f"{w}::seg_ref_std"][i]), tag=(tags.get(w) or [""] * (i + 1))[i],
            ))
            start += r
    return installed_hooks(model)


def load_hooked(model_dir: str | Path, hooks_dir: str | Path, **load_kwargs):
    """One call to reload a hooked model: the base model from ``model_dir`` plus the hooks of ``hooks_dir``.

    Returns :class:`editing.models.LoadedModel` whose ``model`` has the hooks installed.
    """
    from editing.models import load

    loaded = load(model_dir, **load_kwargs)
    load_hooks(loaded.model, hooks_dir)
    return loaded


@torch.no_grad()
def hook_firing_rate(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8,
                     max_length: int = 128) -> float:
    """Share of the (non-padding) tokens of ``texts`` at which any installed hook fires (0.0 with no hooks)."""
    hs = hookset(model)
    if hs is None or not texts:
        return 0.0
    device = next(model.parameters()).device
    fired_total, valid_total = 0, 0
    prev = hs.context.record
    hs.context.record = True
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            enc = {k: v.to(device) for k, v in enc.items()}
            for layer in hs.layers.values():
                layer.last_fired = None
            uncached(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            valid = enc["attention_mask"].bool()
            fired = torch.zeros_like(valid)
            for layer in hs.layers.values():
                if layer.last_fired is not None:
                    fired |= layer.last_fired
            fired_total += int((fired & valid).sum())
            valid_total += int(valid.sum())
    finally:
        hs.context.record = prev
        for layer in hs.layers.values():
            layer.last_fired = layer.last_valid = None
    return fired_total / max(valid_total, 1)


__all__ = ["apply_hook_delta", "hooks_delta", "save_hooks", "load_hooks", "load_hooked", "hook_firing_rate",
           "installed_hooks", "uninstall_all", "forced_firing"]


# ===================================================================== the editor
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from editing.editors.base import EditorState, EditResult, RequestDiagnostics  # noqa: E402


@dataclass
class HookHparams:
    """Hyperparameters of :class:`HookEditor`.

    ``layers``: edited layers (``None``: the model's preset, else a default from the
    depth). ``lam``: weight of ``C0`` in ``C_accu = λ C0 + Σ KKᵀ``. ``corpus``:
    the text ``C0`` is estimated on (see :mod:`editing.stats`), cached under
    ``stats_dir``. Gate: ``alpha0`` start, ``alpha_margin`` (α = margin · smallest
    z of the tracked edit prompts), ``alpha_min`` floor, ``n0`` reference
    pseudo-positions, ``ref_gate`` (also require an outlier against general text),
    ``reference_corpus`` (general text for the reference keys; default: ``corpus``),
    of which ``n_ref_texts`` texts are used, ``n_ref_keys`` / ``max_tracked`` sizes
    of the fixed-size reference-key and tracked-prompt stores per layer.
    """

    layers: tuple[int, ...] | None = None
    lam: float = 1.5e4
    corpus: str = "samples:64"
    stats_dir: str = field(default_factory=lambda: os.environ.get("EDITOPS_STATS_DIR", "stats"))
    alpha0: float = 2.2
    alpha_margin: float = 0.9
    alpha_min: float = 1.0
    n0: float = DEFAULT_N0
    ref_gate: bool = True
    reference_corpus: str | None = None
    n_ref_texts: int = 32
    n_ref_keys: int = 1024
    max_tracked: int = 64
    value_steps: int = 25
    value_lr: float | None = None   # None: the step in units of the residual (the preset's, else DEFAULT_LR_REL)
    clamp_norm_factor: float = 4.0
    kl_weight: float = 0.0625
    context_templates: tuple[str, ...] | None = None


def default_layers(model: nn.Module, spec, tokenizer=None, requests: Sequence = ()) -> tuple[int, ...]:
    """The edited layers when none are given: the model's preset (:mod:`editing.editors.presets`), else
    the causal trace of the first batch (:func:`editing.editors.layers.choose_layers`), as the
    neuron-level editor chooses them; without requests, MEMIT's rule of thumb (the earliest MLPs)."""
    from editing.editors.presets import preset_for

    preset = preset_for(model)
    if preset is not None and preset.layers:
        return tuple(int(x) for x in preset.layers)
    if tokenizer is not None and requests:
        from editing.editors.layers import choose_layers

        return tuple(int(x) for x in choose_layers(model, tokenizer, spec, list(requests)[:8]).layers)
    from editing.editors.layers import default_n_edit

    return tuple(range(default_n_edit(spec.num_layers(model.config))))


@torch.no_grad()
def _block_outputs_at(model: nn.Module, block_name: str, rows, positions, pad_id: int) -> torch.Tensor:
    """Residual stream after block ``block_name`` at ``positions[i]`` of ``rows[i]`` → (n, d_model)."""
    from editing.editors.keys import pad_right

    ids, mask = pad_right(rows, pad_id)
    device = next(model.parameters()).device
    got: dict[str, torch.Tensor] = {}

    def hook(_m, _a, output):
        hs = output[0] if isinstance(output, tuple) else output
        got["h"] = hs[torch.arange(len(rows)), torch.tensor(list(positions))].detach().float().cpu()

    handle = get_module(model, block_name).register_forward_hook(hook)
    try:
        uncached(model, input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        handle.remove()
    return got["h"]


@torch.no_grad()
def _sequence_inputs(model: nn.Module, module_names, rows, pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs of each module at every position: ``({name: (n, T, d_in)}, mask (n, T))`` (right-padded)."""
    from editing.editors.keys import pad_right

    ids, mask = pad_right(rows, pad_id)
    device = next(model.parameters()).device
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in module_names:
        def pre(_m, args, name=name):
            got[name] = args[0].detach().float().cpu()
        handles.append(get_module(model, name).register_forward_pre_hook(pre))
    try:
        uncached(model, input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
    return got, mask.bool()


def _merge_tracked(old: tuple | None, new: tuple, limit: int, margins: torch.Tensor | None):
    """Concatenate tracked prompts ``(keys (P,T,d), mask (P,T), pos (P))`` and keep the ``limit``
    with the smallest z-margin (the prompts most at risk of not firing)."""
    if old is not None:
        t = max(old[0].shape[1], new[0].shape[1])

        def pad(k, m):
            return (torch.nn.functional.pad(k, (0, 0, 0, t - k.shape[1])),
                    torch.nn.functional.pad(m, (0, t - m.shape[1])))
        ok, om = pad(old[0], old[1])
        nk, nm = pad(new[0], new[1])
        keys, mask, pos = torch.cat([ok, nk]), torch.cat([om, nm]), torch.cat([old[2], new[2]])
    else:
        keys, mask, pos = new
    if keys.shape[0] > limit and margins is not None:
        keep = torch.sort(torch.argsort(margins)[:limit]).values
        keys, mask, pos = keys[keep], mask[keep], pos[keep]
    return keys, mask, pos


class HookEditor:
    """CoachHooK-style editor: a gated low-rank hook per edited layer, updated in closed form.

    For a batch with keys ``K`` (n × d_in, at the subject's last token, averaged over
    context templates) and residuals ``R`` (MEMIT spreading over the edited layers,
    target values from :func:`editing.editors.values.compute_values` on the current
    hooked model):

        ΔW_batch = Rᵀ K (C_accu + KᵀK)⁻¹  = U Vᵀ,      C_accu ← C_accu + KᵀK

    with ``C_accu`` starting at ``λ C0``. The hook's total ``ΔW`` is the sum of the
    batches' factors (rank grows by n per batch). After the solve, the gate of each
    layer is recomputed for the whole ``ΔW``: the reference ``(μ_ref, σ_ref)`` of
    ``‖ΔW k‖`` over the stored reference keys (non-edited positions of edit prompts,
    a fixed-size sample), then ``α ← max(alpha_min, min(α_prev, margin · z_min))``
    where ``z_min`` is the smallest z-score at the edited token over the tracked edit
    prompts of this and earlier batches (keys stored in the state, at most
    ``max_tracked`` per layer, the most at-risk ones kept). A prompt still below α
    (α hit its floor) is reported in the diagnostics.

    The model comes back bit-for-bit as given (hooks included): the update is
    installed temporarily while later layers are solved and removed by dropping its
    columns. ``result.delta`` is a ``kind="hook"`` delta; apply it with
    ``result.delta.apply(model)``.
    """

    name = "hook"

    def __init__(self, **hparams: Any) -> None:
        known = set(HookHparams.__dataclass_fields__)
        unknown = set(hparams) - known
        if unknown:
            from editing.errors import EditopsError

            raise EditopsError(f"unknown hook-editor hyperparameters {sorted(unknown)}; known: {sorted(known)}")
        if hparams.get("layers") is not None:
            hparams["layers"] = tuple(int(x) for x in hparams["layers"])
        if hparams.get("context_templates") is not None:
            hparams["context_templates"] = tuple(hparams["context_templates"])
        self.hp = HookHparams(**hparams)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self.hp)

    # ------------------------------------------------------------------ helpers
    def _c0(self, model, tokenizer, spec, layers, fp) -> dict[int, torch.Tensor]:
        from editing.stats import corpus_moments

        hs = hookset(model)
        if hs is not None:  # C0 describes the base model: keys with no hook firing
            prev, hs.context.force = hs.context.force, False
            saved = {n: l.segments for n, l in hs.layers.items()}
            for l in hs.layers.values():
                l.segments = []
                l._rebuild()
        try:
            return corpus_moments(model, tokenizer, spec, layers, self.hp.corpus, self.hp.stats_dir, fp,
                                  progress=False)
        finally:
            if hs is not None:
                for n, l in hs.layers.items():
                    l.segments = saved[n]
                    l._rebuild()
                hs.context.force = prev

    def _reference_keys(self, model, tokenizer, module_names, pad) -> dict[str, torch.Tensor]:
        """Keys of general text at every position (base model, hooks silent), ``n_ref_keys`` sampled per module."""
        from editing.editors.keys import prompt_ids
        from editing.stats import corpus_texts

        texts = corpus_texts(self.hp.reference_corpus or self.hp.corpus, model, tokenizer)[: self.hp.n_ref_texts]
        limit = getattr(tokenizer, "model_max_length", None) or 10**6
        limit = min(int(limit), 128)
        rows = [prompt_ids(tokenizer, t)[:limit] for t in texts]
        rows = [r for r in rows if r]
        hs = hookset(model)
        saved = {}
        if hs is not None:
            saved = {n: l.segments for n, l in hs.layers.items()}
            for l in hs.layers.values():
                l.segments = []
                l._rebuild()
        try:
            out: dict[str, list[torch.Tensor]] = {n: [] for n in module_names}
            for i in range(0, len(rows), 8):
                seqs, mask = _sequence_inputs(model, module_names, rows[i:i + 8], pad)
                for n in module_names:
                    out[n].append(seqs[n][mask])
        finally:
            if hs is not None:
                for n, l in hs.layers.items():
                    l.segments = saved[n]
                    l._rebuild()
        g = torch.Generator().manual_seed(0)
        result = {}
        for n, parts in out.items():
            keys = torch.cat(parts)
            if keys.shape[0] > self.hp.n_ref_keys:
                keys = keys[torch.sort(torch.randperm(keys.shape[0], generator=g)[: self.hp.n_ref_keys]).values]
            result[n] = keys.contiguous()
        return result

    # -------------------------------------------------------------------- edit
    def edit(self, model: nn.Module, tokenizer, requests: Sequence, state: EditorState | None = None) -> EditResult:
        from editing.arch import spec_for
        from editing.editors.keys import (DEFAULT_CONTEXT_TEMPLATES, check_length, compute_keys, fill,
                                          pad_id_of, prompt_ids, subject_last_token)
        from editing.editors.solve import memit_factors, residual_norms
        from editing.editors.values import ValueHparams, compute_values
        from editing.errors import RequestError, StateError
        from editing.models import fingerprint
        from editing.requests import FactRequest

        hp = self.hp
        requests = list(requests)
        if not requests:
            raise RequestError("no requests to edit")
        bad = [r for r in requests if not isinstance(r, FactRequest)]
        if bad:
            raise RequestError(f"the hook editor edits fact requests; {bad[0].request_id!r} is a "
                               f"{type(bad[0]).__name__} (use the rank-one deletion editor for deletions)")
        if state is not None and state.editor != self.name:
            raise StateError(f"state belongs to editor {state.editor!r}, not 'hook'")
        t0 = time.perf_counter()
        spec = spec_for(model)
        if hp.layers:
            layers = tuple(sorted(hp.layers))
        elif state is not None and state.meta.get("layers"):
            layers = tuple(int(x) for x in state.meta["layers"])
        else:
            layers = default_layers(model, spec, tokenizer, requests)
        templates = hp.context_templates or DEFAULT_CONTEXT_TEMPLATES
        for r in requests:
            check_length(model, tokenizer, r, templates)
        pad = pad_id_of(tokenizer)
        names = {l: spec.mlp_out_name(l) for l in layers}
        weights = {l: f"{names[l]}.weight" for l in layers}
        fp = fingerprint(model)
        tensors = dict(state.tensors) if state is not None else {}
        n_batches = int(state.meta.get("n_batches", 0)) if state is not None else 0
        for l in layers:
            if state is not None and f"{weights[l]}::C_accu" not in tensors:
                raise StateError(f"state has no C_accu for {weights[l]}: it was made with other layers "
                                 f"({state.meta.get('layers')}); edit with those layers")

        # C_accu = λ C0 at the first batch
        missing = [l for l in layers if f"{weights[l]}::C_accu" not in tensors]
        if missing:
            c0 = self._c0(model, tokenizer, spec, missing, fp)
            for l in missing:
                tensors[f"{weights[l]}::C_accu"] = (hp.lam * c0[l].double()).float()

        missing = [l for l in layers if f"{weights[l]}::ref_keys" not in tensors]
        if missing:
            ref = self._reference_keys(model, tokenizer, [names[l] for l in missing], pad)
            for l in missing:
                tensors[f"{weights[l]}::ref_keys"] = ref[names[l]]

        vh = ValueHparams(steps=hp.value_steps, lr=hp.value_lr, clamp_norm_factor=hp.clamp_norm_factor,
                          kl_weight=hp.kl_weight, context_templates=tuple(templates))
        last = layers[-1]
        was_training = model.training
        model.eval()
        installed: list[tuple[str, Segment]] = []
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        extras: dict[str, torch.Tensor] = {}
        layer_info: dict[str, Any] = {}
        try:
            values = compute_values(model, tokenizer, spec, requests, last, vh)
            bare_rows = [prompt_ids(tokenizer, r.text) for r in requests]
            bare_pos = [subject_last_token(tokenizer, r.prompt, r.subject) for r in requests]
            resid_info = {}
            for i, l in enumerate(layers):
                K = compute_keys(model, tokenizer, spec, requests, l, templates).double()
                cur = _block_outputs_at(model, spec.layer_name(last), bare_rows, bare_pos, pad).double()
                R = (values.z.double() - cur) / (len(layers) - i)
                C = tensors[f"{weights[l]}::C_accu"].double()
                U, V = memit_factors(K, R, C, 1.0)
                resid_info[l] = residual_norms(K, R, U, V)
                tensors[f"{weights[l]}::C_accu"] = (C + K.T @ K).float()
                layer = ensure_hook(model, names[l], n0=hp.n0, ref_gate=hp.ref_gate)
                seg = Segment(u=U.float(), v=V.float(), alpha=layer.alpha if layer.segments else hp.alpha0,
                              ref_mean=layer.ref[0], ref_std=layer.ref[1], tag="pending")
                layer.push(seg)
                installed.append((names[l], seg))
                factors[weights[l]] = (seg.u, seg.v)

            # gates: reference keys and tracked prompts under the whole ΔW of each layer
            ctx_rows, ctx_pos = [], []
            for r in requests:
                for c in templates:
                    tpl = fill(c, r.prompt)
                    ctx_rows.append(prompt_ids(tokenizer, fill(tpl, r.subject)))
                    ctx_pos.append(subject_last_token(tokenizer, tpl, r.subject))
            seqs, smask = _sequence_inputs(model, list(names.values()), ctx_rows, pad)
            n_t = len(templates)
            lowest_z: dict[str, list[float]] = {r.request_id: [] for r in requests}
            for l in layers:
                w = weights[l]
                layer = installed_hooks(model)[names[l]]
                x = seqs[names[l]]
                ref_keys = tensors[f"{w}::ref_keys"]
                dn = layer.deviation(ref_keys.to(layer.V)).norm(dim=-1).double()
                mu, sd = float(dn.mean()), float(dn.std(unbiased=False)) if dn.numel() > 1 else 1.0
                sd = max(sd, 1e-6 * max(mu, 1e-12))
                # tracked prompts: the bare edit prompts of this batch (rows 0, n_t, 2 n_t, …) plus earlier ones
                sel = torch.arange(0, len(ctx_rows), n_t)
                new = (x[sel], smask[sel], torch.tensor(ctx_pos)[sel])
                old = None
                if f"{w}::track_keys" in tensors:
                    old = (tensors[f"{w}::track_keys"], tensors[f"{w}::track_mask"].bool(), tensors[f"{w}::track_pos"])
                keys, mask, pos = _merge_tracked(old, new, 10**9, None)
                layer.segments[-1].ref_mean, layer.segments[-1].ref_std = mu, sd
                z = layer.scores(layer.deviation(keys.to(layer.V)).norm(dim=-1), mask)
                z_at = z[torch.arange(keys.shape[0]), pos.long()]
                prev_alpha = float(tensors[f"{w}::alpha"]) if f"{w}::alpha" in tensors else hp.alpha0
                alpha = max(hp.alpha_min, min(prev_alpha, hp.alpha_margin * float(z_at.min())))
                layer.segments[-1].alpha = alpha
                keys, mask, pos = _merge_tracked(old, new, hp.max_tracked, z_at - alpha)
                tensors[f"{w}::track_keys"] = keys.contiguous()
                tensors[f"{w}::track_mask"] = mask.to(torch.uint8).contiguous()
                tensors[f"{w}::track_pos"] = pos.long().contiguous()
                tensors[f"{w}::alpha"] = torch.tensor(alpha, dtype=torch.float64)
                extras[f"{w}::alpha"] = torch.tensor(alpha, dtype=torch.float64)
                extras[f"{w}::ref_mean"] = torch.tensor(mu, dtype=torch.float64)
                extras[f"{w}::ref_std"] = torch.tensor(sd, dtype=torch.float64)
                n_old = 0 if old is None else old[0].shape[0]
                for j, r in enumerate(requests):
                    lowest_z[r.request_id].append(float(z_at[n_old + j]))
                layer_info[w] = {"alpha": alpha, "alpha_prev": prev_alpha, "z_min": float(z_at.min()),
                                 "ref_mean": mu, "ref_std": sd, "rank": layer.rank,
                                 "tracked_not_firing": int((z_at < alpha).sum())}

            diagnostics = self._diagnose(model, tokenizer, requests, values, resid_info, lowest_z, layers, layer_info)
        finally:
            for name, seg in reversed(installed):
                hooks = installed_hooks(model)
                if name in hooks:
                    hooks[name].pop_matching(seg.u, seg.v)
                    if hooks[name].rank == 0:
                        uninstall_hook(model, name)
            model.train(was_training)

        delta = LowRankDelta(
            factors=factors, base_fingerprint=fp, editor=self.name, hyperparameters=self.hyperparameters,
            request_ids=[r.request_id for r in requests], kind="hook", extras=extras,
            meta={"n0": hp.n0, "ref_gate": hp.ref_gate, "layers": list(layers), "gates": layer_info, "batch": n_batches + 1,
                  "seconds": round(time.perf_counter() - t0, 3)},
        )
        new_state = EditorState(editor=self.name, tensors=tensors,
                                meta={"layers": list(layers), "n_batches": n_batches + 1, "lam": hp.lam,
                                      "corpus": hp.corpus, "n_edits": int((state.meta.get("n_edits", 0)
                                                                           if state else 0) + len(requests))})
        return EditResult(delta=delta, state=new_state, diagnostics=diagnostics)

    def _diagnose(self, model, tokenizer, requests, values, resid_info, lowest_z, layers, layer_info):
        """Per request, with this batch's hooks installed and gated as they will be:
        P(new) > P(true) on the edit prompt (or new target top-1 when no true target) and the gate fires."""
        from editing.metrics.facts import score_pairs

        pairs = []
        for r in requests:
            pairs.append((r.text, r.target_new))
            if r.target_true is not None:
                pairs.append((r.text, r.target_true))
        scores = score_pairs(model, tokenizer, pairs)
        out = []
        for i, r in enumerate(requests):
            new = scores[(r.text, r.target_new)]
            took = new.logprob_mean > scores[(r.text, r.target_true)].logprob_mean if r.target_true is not None \
                else new.top1
            zs = lowest_z[r.request_id]
            fires = all(z >= layer_info[f"{w}"]["alpha"] for z, w in zip(zs, layer_info))
            msg = "" if took and fires else (
                "edit did not take: P(new) ≤ P(true) on the edit prompt" if not took else
                "edit took but the hook does not fire at the subject on every layer (α at its floor)")
            out.append(RequestDiagnostics(
                request_id=r.request_id, succeeded=bool(took and fires), value_loss=float(values.nll[i]),
                residual_norm=float(sum(float(resid_info[l][i]) for l in layers)), message=msg,
                extra={"logprob_new": new.logprob_mean, "z_at_subject": zs, "fires": fires,
                       "value_nll_init": float(values.nll_init[i])}))
        return out

"""Hyperparameters of the closed-form editors, presets for known models, and measured choices.

``EditHparams`` holds everything an editor run depends on; it is recorded in
every delta (``delta.hyperparameters``) so a version says how it was made.

Presets (``PRESETS``) are keyed by ``(model_type, n_layers)``. Each says where
its numbers come from. A model with no preset gets its layers from a causal
trace (:func:`editing.editors.layers.choose_layers`) and its ``λ`` from
:func:`calibrate_lambda` on a few held-out requests; the choice is recorded with
``source="measured"``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from editing.editors.values import ValueHparams


@dataclass
class EditHparams:
    """One editor run's settings (``None`` = choose by preset, else by measurement)."""

    layers: tuple[int, ...] | None = None
    lam: float | None = None                 # weight of C0 in the regulariser (MEMIT's mom2_update_weight)
    corpus: str = "samples:64"               # key statistics corpus (editing.stats.corpus_texts)
    stats_dir: str = field(default_factory=lambda: os.environ.get("EDITOPS_STATS_DIR", "stats"))
    value: ValueHparams = field(default_factory=ValueHparams)
    key_templates: tuple[str, ...] | None = None   # None: the value templates
    # sequential (nse) choices
    accumulate: bool = False                 # add earlier batches' K Kᵀ to the regulariser (C_edits)
    rewind: bool = False                     # compute values on the original weights (kept in the state)
    nullspace: bool = False                  # project updates onto C0's null space (AlphaEdit)
    nullspace_threshold: float = 2e-2        # relative to C0's largest eigenvalue
    alpha: float = 1.0                       # AlphaEdit's ridge
    neuron_share: float | None = None        # update only neurons holding this share of Σ|k| (NSE)
    repasses: int = 0                        # extra passes for requests whose residual is still large
    residual_tol: float = 0.3                # ‖z − h‖ / ‖z − h₀‖ above this is re-edited
    on_noop: str = "report"                  # "report": skip and say so; "raise": NoOpEditError
    warn_below: float = 0.9                  # warn when the batch's success rate is below this
    source: str = "default"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditHparams":
        d = dict(d)
        v = d.pop("value", None) or {}
        if "context_templates" in v:
            v["context_templates"] = tuple(v["context_templates"])
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        if d.get("key_templates") is not None:
            d["key_templates"] = tuple(d["key_templates"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(value=ValueHparams(**v), **{k: val for k, val in d.items() if k in known})


@dataclass(frozen=True)
class Preset:
    layers: tuple[int, ...]
    lam: float
    clamp_norm_factor: float
    note: str


PRESETS: dict[tuple[str, int], Preset] = {
    # MEMIT's published settings (read from its public hparams files)
    ("gpt2", 48): Preset((13, 14, 15, 16, 17), 2e4, 0.75, "GPT-2 XL, MEMIT paper"),
    ("gptj", 28): Preset((3, 4, 5, 6, 7, 8), 1.5e4, 0.75, "GPT-J 6B, MEMIT paper"),
    ("llama", 32): Preset((4, 5, 6, 7, 8), 1.5e4, 0.75, "Llama-3-8B, AlphaEdit public hparams"),
    # GPT-2 small (12 layers): MEMIT's layer share of GPT-2 XL scaled to depth; not measured here
    ("gpt2", 12): Preset((3, 4, 5), 2e4, 0.75, "GPT-2 small, scaled from GPT-2 XL (unmeasured)"),
}


def preset_for(model: nn.Module) -> Preset | None:
    """The preset for this model's ``(model_type, n_layers)``, or ``None``."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return PRESETS.get((getattr(cfg, "model_type", ""), int(n or 0)))


def with_preset(hp: EditHparams, model: nn.Module) -> EditHparams:
    """``hp`` with unset layers/λ filled from the model's preset (``source="preset"``), if it has one."""
    p = preset_for(model)
    if p is None or (hp.layers is not None and hp.lam is not None):
        return hp
    return replace(hp, layers=hp.layers or p.layers, lam=hp.lam if hp.lam is not None else p.lam,
                   value=replace(hp.value, clamp_norm_factor=p.clamp_norm_factor), source=f"preset: {p.note}")


DEFAULT_LAMBDA_GRID = (1e4, 3e3, 1e3, 3e2, 1e2, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1)


def calibrate_lambda(editor_factory, model: nn.Module, tokenizer, requests, grid=DEFAULT_LAMBDA_GRID,
                     target: float = 1.0) -> tuple[float, list[dict[str, Any]]]:
    """The largest ``λ`` in ``grid`` (strongest protection of C0's keys) whose edits of the
    held-out ``requests`` succeed at rate ≥ ``target``; else the one with the best rate.

    ``editor_factory(lam)`` returns an editor; nothing is applied to ``model``.
    Returns ``(λ, trials)`` with each trial's success rate.
    """
    trials = []
    for lam in sorted(grid, reverse=True):
        res = editor_factory(lam).edit(model, tokenizer, requests, None)
        rate = sum(d.succeeded for d in res.diagnostics) / max(len(res.diagnostics), 1)
        trials.append({"lam": lam, "success": rate})
        if rate >= target:
            return lam, trials
    best = max(trials, key=lambda t: (t["success"], t["lam"]))
    return best["lam"], trials

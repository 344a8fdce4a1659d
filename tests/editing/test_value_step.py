"""The value optimisation's step is in units of the residual it edits (``ValueHparams.lr_rel``), and a value that
has not reached its target when its budget ends gets more steps at twice the step (``escalations``).

A Llama computes the same function when its residual stream is ten times larger (embeddings and the matrices
that write into the residual × 10, :func:`bench.residual_scale.rescaled`): RMSNorm reads it scale-free. Such
models differ from each other by that much in practice, so an edit must not depend on it."""
from __future__ import annotations

import pytest
import torch

from bench.residual_scale import rescaled
from editing.arch import spec_for
from editing.editors.values import ValueHparams, compute_values
from editing.errors import HyperparameterError
from tinyworld import facts, requests, tiny_llama  # noqa: F401  (fixtures)

SCALE = 10.0


@pytest.fixture(scope="module")
def tiny_llama_x10(tiny_llama):
    model, tok = tiny_llama
    big = rescaled(model, SCALE)
    ids = tok(["Abo Kel works as a"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(big(ids).logits, model(ids).logits, atol=1e-2)   # the same function
    return big, tok


def test_values_follow_the_residual_scale_and_a_fixed_step_does_not(tiny_llama, tiny_llama_x10, facts):
    model, tok = tiny_llama
    big, _ = tiny_llama_x10
    reqs = requests(facts, 3)
    hp = dict(context_templates=("{}",))
    small = compute_values(model, tok, spec_for(model), reqs, 0, ValueHparams(**hp))
    large = compute_values(big, tok, spec_for(big), reqs, 0, ValueHparams(**hp))
    assert float((large.delta - SCALE * small.delta).norm() / (SCALE * small.delta).norm()) < 1e-2
    assert large.escalations == small.escalations and large.steps == small.steps
    assert max(large.nll) < 0.5 and max(small.nll) < 0.5
    # MEMIT's absolute step (0.5): fine at one scale, ten times too short at the other
    fixed_small = compute_values(model, tok, spec_for(model), reqs, 0, ValueHparams(**hp, lr=0.5))
    fixed_large = compute_values(big, tok, spec_for(big), reqs, 0, ValueHparams(**hp, lr=0.5))
    assert sum(n < 0.5 for n in fixed_large.nll) < sum(n < 0.5 for n in fixed_small.nll)
    assert fixed_large.escalations == [0, 0, 0]   # a fixed step keeps MEMIT's one budget


def test_a_value_short_of_its_target_gets_more_steps_at_twice_the_step(tiny_llama, facts):
    """On the tiny Llama two of three values need ‖δ‖ ≈ 1.5–1.6 ‖h‖; 25 steps of ``DEFAULT_LR_REL · σ`` do not get there. A
    strict ``loss_stop`` leaves the third unfinished at the budget's end too: it ends there all the same."""
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 3)
    hp = dict(context_templates=("{}",), loss_stop=1e-4)
    once = compute_values(model, tok, spec, reqs, 0, ValueHparams(**hp, escalations=0))
    more = compute_values(model, tok, spec, reqs, 0, ValueHparams(**hp))
    stuck = [i for i, n in enumerate(once.nll) if n > 0.5]
    assert stuck and once.escalations == [0, 0, 0] and once.steps == 25
    assert all(more.escalations[i] >= 1 for i in stuck)
    assert all(more.nll[i] < 0.5 for i in stuck)
    # a value within reach_nll at the first budget's end is not touched again, finished or not
    rest = sorted(set(range(3)) - set(stuck))
    assert rest and all(once.nll[i] > 1e-4 for i in rest)
    for i in rest:
        assert more.escalations[i] == 0 and torch.equal(more.delta[i], once.delta[i])


@pytest.mark.parametrize("bad", [{"lr_rel": 0}, {"lr_rel": True}, {"lr": -1.0}, {"escalations": -1},
                                 {"escalations": 1.5}, {"reach_nll": 0}])
def test_value_step_settings_are_checked(bad):
    with pytest.raises(HyperparameterError, match=next(iter(bad))):
        ValueHparams(**bad)


@pytest.mark.slow
def test_an_edit_of_the_same_model_with_a_ten_times_larger_residual_is_the_same_edit(tiny_llama, tiny_llama_x10,
                                                                                      facts, tmp_path, monkeypatch):
    """The whole ``nse`` edit, layers and λ measured (no preset): the same choices, the same edits taken, ΔW × 10."""
    from editing.editors import get_editor

    monkeypatch.setenv("EDITOPS_STATS_DIR", str(tmp_path))
    model, tok = tiny_llama
    big, _ = tiny_llama_x10
    reqs, cal = requests(facts, 4), requests(facts, 4, offset=10)
    small = get_editor("nse", calibration_requests=cal).edit(model, tok, reqs, None)
    large = get_editor("nse", calibration_requests=cal).edit(big, tok, reqs, None)
    for key in ("layers", "lam", "locus"):
        assert large.delta.meta.get(key) == small.delta.meta.get(key), key
    assert [d.succeeded for d in large.diagnostics] == [d.succeeded for d in small.diagnostics]
    assert large.delta.meta["value_sigma"] == pytest.approx(SCALE * small.delta.meta["value_sigma"], rel=1e-3)
    for name in small.delta.factors:
        a, b = small.delta.dense(name), large.delta.dense(name)
        assert float((b - SCALE * a).norm() / (SCALE * a).norm()) < 0.05, name


def test_a_version_recorded_before_the_relative_step_is_rebuilt_with_its_fixed_step():
    """Versions registered before the relative step recorded ``value.lr = 0.5`` and none of the new keys; a replay
    (``registry.revert``) rebuilds their editor from that record, and must take the step they were made with."""
    from dataclasses import asdict

    from editing.editors import get_editor

    recorded = {k: v for k, v in asdict(ValueHparams()).items() if k not in ("lr_rel", "reach_nll", "escalations")}
    recorded["lr"] = 0.5
    assert get_editor("nse", value=recorded).hp.value.lr == 0.5
    assert get_editor("nse").hp.value.lr is None and get_editor("nse").hp.value.lr_rel is None


def test_the_step_is_the_presets_else_the_default(tiny_llama):
    """Like the clamp: SmolLM2's preset gives its own (MEMIT's 0.5 at its scale), a model without one the default,
    and a step the user gave is kept."""
    from editing.editors.hparams import EditHparams, with_model_defaults
    from editing.editors.presets import PRESETS
    from editing.editors.values import DEFAULT_LR_REL

    model, _ = tiny_llama
    assert with_model_defaults(EditHparams(), model).value.lr_rel == DEFAULT_LR_REL
    given = EditHparams(value=ValueHparams(lr_rel=0.2))
    assert with_model_defaults(given, model).value.lr_rel == 0.2
    assert PRESETS[("llama", 30, 576)].value_lr_rel == 0.1
    fixed = EditHparams(value=ValueHparams(lr=0.5))   # MEMIT's fixed step: nothing relative to record
    assert with_model_defaults(fixed, model).value.lr_rel is None


def test_no_steps_means_no_optimisation(tiny_llama, facts):
    """``steps=0`` returns ``δ = 0``: no budget, nothing to double."""
    model, tok = tiny_llama
    res = compute_values(model, tok, spec_for(model), requests(facts, 2), 0, ValueHparams(steps=0))
    assert float(res.delta.abs().max()) == 0.0 and res.escalations == [0, 0]

"""Unknown models: layers chosen by causal tracing, λ by calibration, the choice recorded in the delta."""
from __future__ import annotations

import warnings

from editing.arch import spec_for
from editing.editors import get_editor
from editing.editors.hparams import preset_for
from editing.editors.layers import causal_trace, choose_layers
from tinyworld import facts, requests, tiny_llama  # noqa: F401  (fixtures)


def test_trace_and_calibration_on_a_model_without_preset(tiny_llama, facts, tmp_path):
    model, tok = tiny_llama
    assert preset_for(model) is None
    spec = spec_for(model)
    reqs = requests(facts, 6)
    effects = causal_trace(model, tok, spec, reqs[:3], samples=2)
    assert len(effects) == model.config.num_hidden_layers
    tr = choose_layers(model, tok, spec, reqs[:3], samples=2)
    assert len(tr.layers) >= 1 and max(tr.layers) < model.config.num_hidden_layers - 1
    ed = get_editor("nse", stats_dir=str(tmp_path), corpus="samples:8", value={"context_templates": ("{}",)},
                    calibration_requests=reqs[3:6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ed.edit(model, tok, reqs[:2], None)
    hp = res.delta.hyperparameters
    assert hp["source"] == "measured" and hp["layers"] == list(res.delta.meta["layers"]) and hp["lam"] > 0
    assert "trace_effects" in res.delta.meta and res.delta.meta["lambda_trials"]
    # the state carries the choice: the next batch uses the same layers and λ without measuring again
    res2 = ed.edit(model, tok, reqs[2:3], res.state)
    assert res2.delta.meta["layers"] == res.delta.meta["layers"] and res2.delta.meta["lam"] == hp["lam"]
    assert "trace_effects" not in res2.delta.meta

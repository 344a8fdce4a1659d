"""Unknown models: layers chosen by causal tracing, λ by calibration, the choice recorded in the delta."""
from __future__ import annotations

import warnings

import pytest
import torch

from editing.arch import spec_for
from editing.editors import get_editor
from editing.editors.presets import preset_for, preset_key
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


def test_generated_context_templates_are_the_models_own_and_carried_in_the_state(tiny_llama, facts, tmp_path):
    from editing.editors.keys import generated_context_templates

    model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    t1 = generated_context_templates(model, tok)
    t2 = generated_context_templates(model, tok)
    assert t1 == t2                                   # seeded: a function of the weights
    assert torch.equal(torch.get_rng_state(), rng)    # the caller's random state is untouched
    assert t1[0] == "{}" and len(t1) == 6 and all(t.endswith(". {}") for t in t1[1:])
    more = generated_context_templates(model, tok, per_start=3)   # context_per_start: more of the same stream
    assert len(more) == 16 and more[:6] == t1 and len(set(more)) > 6
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    reqs = requests(facts, 3)
    ed = get_editor("nse", layers=[0], locus="subject", lam=30.0, stats_dir=str(tmp_path), corpus="samples:8", value={"steps": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ed.edit(model, tok, reqs[:2], None)
        assert tuple(res.delta.hyperparameters["value"]["context_templates"]) == t1
        assert tuple(res.state.meta["context_templates"]) == t1
        # a continuation uses the templates of the state, whatever the editor would generate now
        res.state.meta["context_templates"] = ["{}", "x. {}"]
        res2 = get_editor("nse", layers=[0], locus="subject", lam=30.0, stats_dir=str(tmp_path), corpus="samples:8",
                          value={"steps": 5}).edit(model, tok, reqs[2:], res.state)
    assert tuple(res2.delta.hyperparameters["value"]["context_templates"]) == ("{}", "x. {}")
    # "fixed" keeps the hand-written defaults
    from editing.editors.keys import DEFAULT_CONTEXT_TEMPLATES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res3 = get_editor("nse", layers=[0], locus="subject", lam=30.0, stats_dir=str(tmp_path), corpus="samples:8", context="fixed",
                          value={"steps": 5}).edit(model, tok, reqs[:1], None)
    assert tuple(res3.delta.hyperparameters["value"]["context_templates"]) == DEFAULT_CONTEXT_TEMPLATES
    # context_per_start: the edit uses (and records) that many prefixes per start word
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res4 = get_editor("nse", layers=[0], locus="subject", lam=30.0, stats_dir=str(tmp_path), corpus="samples:8",
                          context_per_start=3, value={"steps": 5}).edit(model, tok, reqs[:1], None)
    assert tuple(res4.delta.hyperparameters["value"]["context_templates"]) == more
    assert res4.delta.hyperparameters["context_per_start"] == 3
    from editing.editors.hparams import EditHparams
    from editing.errors import HyperparameterError
    for bad in (0, 1.5, True):
        with pytest.raises(HyperparameterError, match="context_per_start"):
            EditHparams(context_per_start=bad)


def test_key_statistics_corpus_is_the_given_one_else_the_presets_else_the_default(tiny_llama, facts, tmp_path):
    """SmolLM2's preset names `stdlib`; a narrow model without a preset gets `samples:512`; an explicit corpus wins.
    The corpus actually used is recorded with the delta (what the registry stores with the version)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from editing.editors.hparams import EditHparams, with_model_defaults, with_preset
    from editing.editors.presets import DEFAULT_CORPUS

    def llama(hidden: int):   # shapes only: the weights are never materialised
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                                num_hidden_layers=30, num_attention_heads=3, num_key_value_heads=1))

    smol_shaped = llama(576)
    assert preset_key(smol_shaped) == ("llama", 30, 576) and preset_for(smol_shaped).corpus == "stdlib"
    assert with_preset(EditHparams(), smol_shaped).corpus == "stdlib"
    assert with_model_defaults(EditHparams(corpus="samples:8"), smol_shaped).corpus == "samples:8"
    assert preset_for(llama(48)) is None     # as deep as SmolLM2, another width: no preset, measured instead
    model, tok = tiny_llama
    assert model.config.intermediate_size <= 512
    assert preset_for(model) is None and with_preset(EditHparams(), model).corpus == DEFAULT_CORPUS == "samples:512"
    # a state carrying layers/λ skips the preset, not the corpus decision
    ed = get_editor("nse", layers=[0], locus="subject", lam=30.0, stats_dir=str(tmp_path), corpus="samples:8", value={"steps": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ed.edit(model, tok, requests(facts, 1), None)
        res2 = get_editor("nse", stats_dir=str(tmp_path), value={"steps": 5}).edit(model, tok, requests(facts, 2)[1:],
                                                                                   res.state)
    assert res.delta.hyperparameters["corpus"] == "samples:8"
    assert res2.delta.hyperparameters["corpus"] == DEFAULT_CORPUS


def test_default_corpus_grows_with_the_key_dimension():
    """Own samples, at least 512 and at least 48 tokens per key dimension: d_ff 2,048 with 48-token samples
    needs 2,048 samples; a 17-token context gives 16-token samples, so d_ff 512 needs 1,536."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from editing.editors.presets import MIN_SAMPLES, SAMPLE_TOKENS_PER_KEY, corpus_for, default_corpus
    from editing.stats import sample_length

    def gpt2(n_inner: int, n_positions: int = 64):
        return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_inner=n_inner,
                                          n_positions=n_positions))

    assert (MIN_SAMPLES, SAMPLE_TOKENS_PER_KEY) == (512, 48)
    assert default_corpus(gpt2(64)) == "samples:512"
    wide = gpt2(2048)
    assert sample_length(wide) == 48 and default_corpus(wide) == corpus_for(wide) == "samples:2048"
    short = gpt2(512, n_positions=17)
    assert sample_length(short) == 16 and default_corpus(short) == "samples:1536"


def test_value_clamp_is_the_users_else_the_presets_in_every_batch(tiny_llama, facts, tmp_path, monkeypatch):
    """The bound on ‖δ‖ / ‖h‖ comes from the preset only where the user gave none, and a later batch
    (which takes layers and λ from the state) uses the same one as the first; without a preset it is 4."""
    from editing.editors import presets
    from editing.editors.hparams import EditHparams, with_model_defaults
    from editing.editors.values import DEFAULT_CLAMP_NORM_FACTOR

    model, tok = tiny_llama
    assert preset_for(model) is None
    assert with_model_defaults(EditHparams(), model).value.clamp_norm_factor \
        == DEFAULT_CLAMP_NORM_FACTOR == 4.0
    key = preset_key(model)
    monkeypatch.setitem(presets.PRESETS, key, presets.Preset((0,), 30.0, 1.5, "test preset", corpus="samples:8"))

    def clamps(**value) -> list[float]:
        kw = {"stats_dir": str(tmp_path), "value": {"steps": 3, **value}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = get_editor("nse", **kw).edit(model, tok, requests(facts, 1), None)
            second = get_editor("nse", **kw).edit(model, tok, requests(facts, 2)[1:], first.state)
        return [r.delta.hyperparameters["value"]["clamp_norm_factor"] for r in (first, second)]

    assert clamps() == [1.5, 1.5]
    assert clamps(clamp_norm_factor=2.0) == [2.0, 2.0]


def test_a_presets_sequential_settings_fill_what_the_user_did_not_give(tiny_llama, facts, tmp_path, monkeypatch):
    """``Preset.sequential``: ``nse`` starts from the preset's settings for every key the user left out, the delta
    records them; a key the user gave wins, MEMIT takes none, and an editor built from a complete ``EditHparams`` (a
    registered version's) takes none; a combination the preset makes invalid names the preset's keys."""
    import pytest

    from editing.editors import presets
    from editing.errors import HyperparameterError

    model, tok = tiny_llama
    key = preset_key(model)
    monkeypatch.setitem(presets.PRESETS, key, presets.Preset(
        (0,), 30.0, 1.5, "test preset", corpus="samples:8",
        sequential={"lam_ladder": 1, "repasses": 2, "repass_on": "not_taken", "other_prompts": 2,
                    "other_prompts_weight": 0.0, "other_prompts_kl": 0.01}))
    kw = {"stats_dir": str(tmp_path), "siblings": 0, "value": {"steps": 3}}

    nse = get_editor("nse", **kw)
    assert nse.hp.lam_ladder == 0 and nse.hp.repasses == 1          # the editor's own defaults, before a model
    hp = nse.settings_for(model)
    assert (hp.lam_ladder, hp.repasses, hp.repass_on, hp.other_prompts, hp.other_prompts_kl) == \
        (1, 2, "not_taken", 2, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = nse.edit(model, tok, requests(facts, 2), None)
    recorded = res.delta.hyperparameters
    assert (recorded["lam_ladder"], recorded["repasses"], recorded["other_prompts"]) == (1, 2, 2)
    assert res.delta.meta["first_lam"] == 100.0 and recorded["lam"] == 30.0   # the ladder: one grid step above λ

    assert get_editor("nse", **kw, repasses=0, lam_ladder=0).settings_for(model).repasses == 0
    assert get_editor("memit", **kw).settings_for(model).lam_ladder == 0
    complete = get_editor("nse", hparams=nse.hp)
    assert complete.settings_for(model) == nse.hp
    with pytest.raises(HyperparameterError, match="the model's preset sets"):
        get_editor("nse", **kw, repass_lam_factor=0.5).settings_for(model)

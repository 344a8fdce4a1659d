"""The edit locus: the subject's last token or the prompt's last token, given or measured, carried in the state."""
from __future__ import annotations

import warnings

import pytest
import torch

from editing.arch import get_module, spec_for
from editing.editors import get_editor
from editing.editors.hparams import EditHparams
from editing.editors.keys import LOCI, block_outputs_at, compute_keys, edit_position, pad_id_of, prompt_ids
from editing.editors.values import ValueHparams, compute_values
from editing.errors import HyperparameterError, SubjectNotInPromptError
from tinyworld import facts, requests, tiny_gpt2, tiny_llama  # noqa: F401  (fixtures)


def test_last_locus_is_the_prompts_last_token_and_bad_choices_are_typed_errors(tiny_gpt2):
    _, tok = tiny_gpt2
    n = len(prompt_ids(tok, "Abo Kel lives in the city of"))
    assert edit_position(tok, "{} lives in the city of", "Abo Kel", "last") == n - 1
    assert edit_position(tok, "{} lives in the city of", "Abo Kel", "subject") < n - 1
    with pytest.raises(SubjectNotInPromptError):      # the subject is checked at either locus
        edit_position(tok, "lives in the city of", "Abo Kel", "last")
    with pytest.raises(HyperparameterError, match="locus"):
        edit_position(tok, "{} lives in the city of", "Abo Kel", "middle")
    with pytest.raises(HyperparameterError, match="locus"):
        EditHparams(locus="middle")


def test_keys_and_values_at_the_last_token(tiny_llama, facts):
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 2)
    keys = compute_keys(model, tok, spec, reqs, 1, context_templates=("{}",), locus="last")
    r = reqs[0]
    ids = torch.tensor([prompt_ids(tok, r.text)])
    seen = []
    h = get_module(model, spec.mlp_out_name(1)).register_forward_pre_hook(lambda m, a: seen.append(a[0][0, -1]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    assert torch.allclose(keys[0], seen[0], atol=1e-5)
    assert not torch.allclose(keys, compute_keys(model, tok, spec, reqs, 1, context_templates=("{}",)))
    res = compute_values(model, tok, spec, reqs, 0, ValueHparams(steps=10, context_templates=("{}",)), locus="last")
    last = [len(prompt_ids(tok, q.text)) - 1 for q in reqs]
    h0 = block_outputs_at(model, spec, 0, [prompt_ids(tok, q.text) for q in reqs], last, pad_id_of(tok))
    assert torch.allclose(res.h, h0.float(), atol=1e-5)
    assert all(a < b for a, b in zip(res.nll, res.nll_init))


def _quiet(fn, *a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a)


def test_auto_locus_is_measured_with_lambda_and_carried_in_the_state(tiny_gpt2, facts, tmp_path):
    """No preset, λ to calibrate: both loci are calibrated unless the subject's edits all take; the locus
    whose calibration edits take more often is kept (the subject's on a tie), recorded, and reused."""
    model, tok = tiny_gpt2
    reqs = requests(facts, 7)
    ed = get_editor("nse", stats_dir=str(tmp_path), corpus="samples:8", layers=[0], siblings=0,
                    value={"context_templates": ("{}",), "steps": 10}, calibration_requests=reqs[4:7])
    res = _quiet(ed.edit, model, tok, reqs[:2], None)
    chosen = res.delta.meta["locus"]
    assert chosen in LOCI and res.state.meta["locus"] == chosen == res.delta.hyperparameters["locus"]
    rates = res.delta.meta["locus_trials"]
    assert rates["subject"] >= 1.0 or set(rates) == set(LOCI)
    if rates["subject"] >= 1.0:
        assert set(rates) == {"subject"} and chosen == "subject"
    else:
        assert chosen == ("last" if rates["last"] > rates["subject"] else "subject")
    if chosen == "last":
        assert res.delta.hyperparameters["subject_key_weight"] == 0.0
    res2 = _quiet(ed.edit, model, tok, reqs[2:3], res.state)
    assert res2.delta.meta["locus"] == chosen and "locus_trials" not in res2.delta.meta
    # a state written before loci existed continues at the subject
    res.state.meta.pop("locus")
    res3 = _quiet(ed.edit, model, tok, reqs[3:4], res.state)
    assert res3.delta.meta["locus"] == "subject"


def test_given_lambda_is_kept_and_the_locus_still_measured_at_it(tiny_gpt2, facts, tmp_path):
    """A λ the user fixes is not a locus choice: with ``locus="auto"`` and no preset the calibration edits
    run at that λ at each locus (a fixed λ used to mean the subject's locus, where the fact world's edits
    never take); a locus the user gives is not measured."""
    model, tok = tiny_gpt2
    reqs = requests(facts, 2)
    kw = {"stats_dir": str(tmp_path), "corpus": "samples:8", "layers": [0], "lam": 30.0, "siblings": 0,
          "value": {"context_templates": ("{}",), "steps": 5}}
    res = _quiet(get_editor("nse", **kw).edit, model, tok, reqs, None)
    trials = res.delta.meta["locus_trials"]
    assert "subject" in trials and res.delta.hyperparameters["lam"] == 30.0
    assert res.delta.meta["locus"] in trials and trials[res.delta.meta["locus"]] == max(trials.values())
    assert [t["lam"] for t in res.delta.meta["lambda_trials"]] == [30.0]
    res = _quiet(get_editor("nse", **kw, locus="subject").edit, model, tok, reqs, None)
    assert res.delta.meta["locus"] == "subject" and "locus_trials" not in res.delta.meta
    res = _quiet(get_editor("nse", **kw, locus="last").edit, model, tok, reqs, None)
    assert res.delta.meta["locus"] == "last" and res.delta.hyperparameters["subject_key_weight"] == 0.0
    assert get_editor("nse").hyperparameters["subject_key_weight"] > 0     # the default is only switched off there

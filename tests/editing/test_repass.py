"""Repasses: which requests are edited again, and under which λ (``repass_on``, ``repass_lam_factor``)."""
from __future__ import annotations

import warnings

import pytest

from editing.editors import get_editor
from editing.editors.hparams import EditHparams
from editing.errors import HyperparameterError
from tinyworld import facts, requests, tiny_llama  # noqa: F401  (fixtures)

KW = {"layers": [0], "locus": "subject", "siblings": 0, "subject_key_weight": 0.0, "corpus": "samples:8",
      "value": {"context_templates": ("{}",), "steps": 15}}


def _edit(model, tok, reqs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_editor("nse", **KW, **kw).edit(model, tok, reqs, None)


def test_a_repass_under_a_weaker_lambda_makes_edits_take_that_the_first_lambda_held_back(tiny_llama, facts,
                                                                                          tmp_path):
    model, tok = tiny_llama
    reqs = requests(facts, 6)
    kw = {"lam": 3e5, "repasses": 1, "repass_on": "not_taken", "stats_dir": str(tmp_path)}
    same = _edit(model, tok, reqs, **kw)
    ladder = _edit(model, tok, reqs, repass_lam_factor=1e-4, **kw)
    taken = lambda res: sum(d.succeeded for d in res.diagnostics)  # noqa: E731
    assert same.delta.meta["repass_lams"] == [3e5] and ladder.delta.meta["repass_lams"] == [pytest.approx(30.0)]
    assert taken(same) == 0                      # λ 3e5 holds every update back, a second pass at it too
    assert taken(ladder) >= 1
    assert taken(ladder) == taken(_edit(model, tok, reqs, lam=30.0, repasses=0, stats_dir=str(tmp_path)))
    # "not_taken" re-edits exactly the requests whose target was not yet on top
    assert len(same.delta.meta["repassed"][0]) == len(reqs)
    assert ladder.delta.hyperparameters["repass_lam_factor"] == 1e-4


def test_repass_settings_are_checked():
    with pytest.raises(HyperparameterError, match="repass_lam_factor"):
        EditHparams(repass_lam_factor=0.0)
    with pytest.raises(HyperparameterError, match="repass_lam_factor"):
        EditHparams(repass_lam_factor=2.0)
    with pytest.raises(HyperparameterError, match="repass_on"):
        EditHparams(repass_on="always")

"""Repasses: which requests are edited again, and under which λ (``repass_on``, ``repass_lam_factor``,
``lam_ladder``)."""
from __future__ import annotations

import warnings

import pytest

from editing.editors import get_editor
from editing.editors.hparams import EditHparams, ladder_lams, ladder_top
from editing.errors import HyperparameterError
from tinyworld import facts, requests, tiny_llama  # noqa: F401  (fixtures)

# the prompt's last token at layer 1: the tiny model (trained in the fixture, so its weights differ by CPU kind
# and thread count) took all 6 edits there at λ 30 and none at 3e5 on a 2-core Intel Xeon at 1 and 2 threads; at
# the subject's last token of layer 0 it took 0 (1 thread) or 1 (2 threads) there, and the tests failed
KW = {"layers": [1], "locus": "last", "siblings": 0, "subject_key_weight": 0.0, "corpus": "samples:8",
      "value": {"context_templates": ("{}",), "steps": 15}}


def _edit(model, tok, reqs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_editor("nse", **KW, **kw).edit(model, tok, reqs, None)


def test_a_repass_under_a_weaker_lambda_makes_edits_take_that_the_first_lambda_held_back(tiny_llama, facts,
                                                                                          tmp_path):
    model, tok = tiny_llama
    reqs = requests(facts, 6)
    kw = {"lam": 3e5, "repasses": 1, "repass_on": "not_taken", "lam_ladder": 0, "stats_dir": str(tmp_path)}
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


def test_the_lambda_ladder_steps_along_the_calibration_grid_and_ends_at_lambda():
    assert ladder_top(3e3, 1) == pytest.approx(1e4)
    assert ladder_top(300.0, 1) == pytest.approx(1e3)
    assert ladder_top(300.0, 2) == pytest.approx(3e3)
    assert ladder_top(1e4, 1) == pytest.approx(1e4 * 10 ** 0.5)      # above the grid: ×√10 a step
    assert ladder_top(90.0, 1) == pytest.approx(270.0)               # off the grid: its nearest value's step
    assert ladder_lams(3e3, 1, 2) == pytest.approx([1e4, 5477.2256, 3e3])
    assert ladder_lams(300.0, 1, 2) == pytest.approx([1e3, 547.72256, 300.0])
    assert ladder_lams(300.0, 1, 0) == [300.0]                      # no repass to come down with: λ itself


def test_with_the_ladder_the_first_solve_is_above_lambda_and_the_last_repass_at_it(tiny_llama, facts, tmp_path):
    model, tok = tiny_llama
    reqs = requests(facts, 6)
    lam = 30.0   # 8 grid steps up: 30 → 100 → … → 1e4, then ×√10 to 3.2e5, where the first test's edits do not take
    top = _edit(model, tok, reqs, lam=ladder_top(lam, 8), repasses=0, stats_dir=str(tmp_path))
    res = _edit(model, tok, reqs, lam=lam, lam_ladder=8, repasses=2, repass_on="not_taken", stats_dir=str(tmp_path))
    lams = ladder_lams(lam, 8, 2)
    assert res.delta.meta["first_lam"] == pytest.approx(lams[0]) == pytest.approx(1e5 * 10 ** 0.5)
    passes = res.delta.meta.get("repass_lams", [])
    assert passes == pytest.approx(lams[1:1 + len(passes)])
    taken = lambda r: {d.request_id for d in r.diagnostics if d.succeeded}  # noqa: E731
    # the first solve is the single solve at λ_top; a repass re-edits exactly the requests it left untaken
    not_taken_at_top = [r.request_id for r in reqs if r.request_id not in taken(top)]
    assert passes and res.delta.meta["repassed"][0] == not_taken_at_top   # λ_top left some untaken
    assert taken(top) < taken(res)
    assert res.delta.hyperparameters["lam"] == lam and res.delta.hyperparameters["lam_ladder"] == 8


def test_ladder_settings_are_checked():
    with pytest.raises(HyperparameterError, match="lam_ladder=0 for repass_lam_factor"):
        EditHparams(lam_ladder=1, repasses=2, repass_lam_factor=0.5)
    with pytest.raises(HyperparameterError, match="lam_ladder"):
        EditHparams(lam_ladder=-1, repasses=1)

"""Subject-alone keys (``subject_key_weight``): the edit follows the subject, not the prompt's wording."""
from __future__ import annotations

from dataclasses import replace

import pytest

import torch

from editing.arch import spec_for
from editing.editors import get_editor
from editing.editors.keys import compute_keys
from editing.editors.siblings import sibling_requests
from editing.errors import HyperparameterError
from editing.models import fingerprint
from tinyworld import facts, requests, siblings_from_world, tiny_llama  # noqa: F401  (fixtures)

TEMPLATES = ("{}", "Note that {}")
KW = {"layers": [0], "lam": 30.0, "siblings": 0, "corpus": "samples:8",
      "value": {"context_templates": TEMPLATES, "steps": 15}}


def test_subject_alone_keys_get_the_edit_and_the_rank_stays_the_batch_size(tiny_llama, facts, tmp_path):
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 3)
    fp = fingerprint(model)
    plain = get_editor("nse", subject_key_weight=0.0, stats_dir=str(tmp_path), **KW).edit(model, tok, reqs, None)
    follow = get_editor("nse", subject_key_weight=3.0, stats_dir=str(tmp_path), **KW).edit(model, tok, reqs, None)
    assert fingerprint(model) == fp
    name = spec.mlp_out_name(0) + ".weight"
    assert follow.delta.factors[name][0].shape[1] <= len(reqs)  # rank ≤ batch size
    assert follow.delta.hyperparameters["subject_key_weight"] == 3.0
    k = compute_keys(model, tok, spec, reqs, 0, TEMPLATES)
    x = compute_keys(model, tok, spec, [replace(r, prompt="{}") for r in reqs], 0, ("Note that {}",))

    def gap(res):  # how far the subject alone is from getting what the edit prompt's key gets
        dw = res.delta.dense(name).float()
        return float(((x - k) @ dw.T).norm() / (k @ dw.T).norm())

    assert gap(follow) < 0.85 * gap(plain), (gap(follow), gap(plain))
    # the subject-alone moment is accumulated for later batches too
    c = next(t for t in follow.state.tensors if t.endswith("::C_edits"))
    assert float(follow.state.tensors[c].trace()) > float(plain.state.tensors[c].trace())
    assert torch.isfinite(follow.state.tensors[c]).all()


def test_siblings_are_held_in_the_subject_alone_frame_too(tiny_llama, facts, tmp_path, monkeypatch):
    """With subject keys on, sibling subjects are held in both frames: the accumulated moment is
    ``KᵀK + w XᵀX + w_s (K_sᵀK_s + w X_sᵀX_s)`` (``w_s`` the sibling weight; without the sibling frame, 100 single SmolLM2 edits lost
    neighbours: bench/RESULTS.md)."""
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 3)
    siblings_from_world(monkeypatch, reqs)
    w, ws = 3.0, 0.5
    res = get_editor("nse", **{**KW, "stats_dir": str(tmp_path), "subject_key_weight": w, "siblings": 2,
                               "sibling_weight": ws}).edit(model, tok, reqs, None)
    assert all(not d.extra.get("no_op") for d in res.diagnostics)
    sibs = sibling_requests(model, tok, reqs, 2)

    def keys(rs, templates):  # layer 0 is the only edited layer: its keys do not depend on the update
        return compute_keys(model, tok, spec, rs, 0, templates).double()

    alone = ("Note that {}",)
    K, X = keys(reqs, TEMPLATES), keys([replace(r, prompt="{}") for r in reqs], alone)
    Ks, Xs = keys(sibs, ("{}",)), keys([replace(s, prompt="{}") for s in sibs], alone)
    expected = K.T @ K + w * X.T @ X + ws * (Ks.T @ Ks + w * Xs.T @ Xs)
    got = res.state.tensors[spec.mlp_out_name(0) + "::C_edits"].double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    without_frame = expected - ws * w * Xs.T @ Xs
    assert not torch.allclose(got, without_frame, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


def test_subject_frame_batch_fits_the_same_update_but_keeps_only_the_prompt_keys(tiny_llama, facts, tmp_path,
                                                                                  monkeypatch):
    """``subject_frame="batch"``: the subject-alone keys (the edits' and the siblings') shape this batch's
    solve exactly as with ``"kept"``, but only ``KᵀK + w_s K_sᵀK_s`` is carried to later batches, so a later
    edit of the same subject is not held back by its own earlier subject-alone key."""
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 3)
    siblings_from_world(monkeypatch, reqs)
    ws = 0.5
    kw = {**KW, "stats_dir": str(tmp_path), "subject_key_weight": 3.0, "siblings": 2, "sibling_weight": ws}
    kept = get_editor("nse", **kw).edit(model, tok, reqs, None)
    batch = get_editor("nse", **kw, subject_frame="batch").edit(model, tok, reqs, None)
    name = spec.mlp_out_name(0)
    assert torch.allclose(kept.delta.dense(name + ".weight"), batch.delta.dense(name + ".weight"), atol=1e-6)
    sibs = sibling_requests(model, tok, reqs, 2)
    K = compute_keys(model, tok, spec, reqs, 0, TEMPLATES).double()
    Ks = compute_keys(model, tok, spec, sibs, 0, ("{}",)).double()
    expected = K.T @ K + ws * Ks.T @ Ks
    got = batch.state.tensors[name + "::C_edits"].double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert batch.delta.hyperparameters["subject_frame"] == "batch"


def test_an_unknown_subject_frame_is_a_typed_error():

    with pytest.raises(HyperparameterError, match="subject_frame='both' is not one of kept, batch"):
        get_editor("nse", subject_frame="both")

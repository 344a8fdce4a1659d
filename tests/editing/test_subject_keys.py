"""Subject-alone keys (``subject_key_weight``): the edit follows the subject, not the prompt's wording."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

import torch

from editing.arch import spec_for
from editing.editors import get_editor
from editing.editors.keys import SUBJECT_AFTER_STARTS, compute_keys
from editing.editors.siblings import sibling_requests
from editing.editors.memit import EditDidNotTakeWarning
from editing.errors import HyperparameterError
from editing.models import fingerprint
from tinyworld import facts, requests, siblings_from_world, tiny_llama  # noqa: F401  (fixtures)

TEMPLATES = ("{}", "Note that {}")
KW = {"layers": [0], "locus": "subject", "lam": 30.0, "siblings": 0, "corpus": "samples:8",
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

    def frames(rs):  # the subject after the prefix, and the subject opening the text (subject_start)
        alone = [replace(r, prompt="{}") for r in rs]
        X, X0 = keys(alone, ("Note that {}",)), keys(alone, ("{}",))
        return X.T @ X + X0.T @ X0

    K, Ks = keys(reqs, TEMPLATES), keys(sibs, ("{}",))
    sib_frames = frames(sibs)
    expected = K.T @ K + w * frames(reqs) + ws * (Ks.T @ Ks + w * sib_frames)
    got = res.state.tensors[spec.mlp_out_name(0) + "::C_edits"].double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    without_frame = expected - ws * w * sib_frames
    assert not torch.allclose(got, without_frame, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


def test_subject_start_keys_give_wordings_that_open_with_the_subject_the_edit(tiny_llama, facts, tmp_path):
    """``subject_start``: the subject as the text's first word is a third key per request, fitted to the
    same residual (``ΔW = Rᵀ(K + w(X + X₀))(λC0 + KᵀK + w(XᵀX + X₀ᵀX₀))⁻¹``, rank still ≤ n), so a
    wording that opens with the subject gets more of the edit than without it."""
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 3)
    # one solve (no repasses): the keys' share of that solve is what is measured
    kw = {**KW, "stats_dir": str(tmp_path), "subject_key_weight": 3.0, "repasses": 0}
    off = get_editor("nse", **kw, subject_start=False).edit(model, tok, reqs, None)
    on = get_editor("nse", **kw).edit(model, tok, reqs, None)
    assert on.delta.hyperparameters["subject_start"] is True and off.delta.hyperparameters["subject_start"] is False
    name = spec.mlp_out_name(0)
    assert on.delta.factors[name + ".weight"][0].shape[1] <= len(reqs)
    alone = [replace(r, prompt="{}") for r in reqs]
    K = compute_keys(model, tok, spec, reqs, 0, TEMPLATES).double()
    X, X0 = (compute_keys(model, tok, spec, alone, 0, t).double() for t in (("Note that {}",), ("{}",)))

    def gap(res):  # how far the subject opening a text is from getting what the edit prompt's key gets
        dw = res.delta.dense(name + ".weight").double()
        return float(((X0 - K) @ dw.T).norm() / (K @ dw.T).norm())

    assert gap(on) < 0.85 * gap(off), (gap(on), gap(off))
    w = 3.0
    expected = K.T @ K + w * (X.T @ X + X0.T @ X0)
    got = on.state.tensors[name + "::C_edits"].double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_subject_after_adds_the_subject_in_those_frames(tiny_llama, facts, tmp_path):
    """``subject_after``: one more subject-alone key set, the subject in each frame (averaged), fitted to the same
    residual and held in ``C_edits`` like the others; the subject after one word gets more of the edit than without
    it. Session 44's switch ``subject_after_starts`` (recorded by versions registered then) reads as these frames."""
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 3)
    kw = {**KW, "stats_dir": str(tmp_path), "subject_key_weight": 3.0, "repasses": 0}
    off = get_editor("nse", **kw).edit(model, tok, reqs, None)
    on = get_editor("nse", **kw, subject_after=list(SUBJECT_AFTER_STARTS)).edit(model, tok, reqs, None)
    assert tuple(on.delta.hyperparameters["subject_after"]) == SUBJECT_AFTER_STARTS
    assert tuple(off.delta.hyperparameters["subject_after"]) == ()
    name = spec.mlp_out_name(0)
    assert on.delta.factors[name + ".weight"][0].shape[1] <= len(reqs)
    alone = [replace(r, prompt="{}") for r in reqs]
    K = compute_keys(model, tok, spec, reqs, 0, TEMPLATES).double()
    X, X0, X1 = (compute_keys(model, tok, spec, alone, 0, t).double()
                 for t in (("Note that {}",), ("{}",), SUBJECT_AFTER_STARTS))

    def gap(res):  # how far the subject after one word is from getting what the edit prompt's key gets
        dw = res.delta.dense(name + ".weight").double()
        return float(((X1 - K) @ dw.T).norm() / (K @ dw.T).norm())

    # the tiny model's layer 0 reads the subject after one word almost as in the prompt (gap < 0.01): closer only
    assert gap(on) < gap(off), (gap(on), gap(off))
    w = 3.0
    expected = K.T @ K + w * (X.T @ X + X0.T @ X0 + X1.T @ X1)
    got = on.state.tensors[name + "::C_edits"].double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    old = get_editor("nse", **kw, subject_after_starts=True).edit(model, tok, reqs, None)
    assert tuple(old.delta.hyperparameters["subject_after"]) == SUBJECT_AFTER_STARTS
    for weight, (u, v) in on.delta.factors.items():
        assert torch.equal(u, old.delta.factors[weight][0]) and torch.equal(v, old.delta.factors[weight][1])
    for frames in (["The"], "The {}", ["{} and {}"], [3]):
        with pytest.raises(HyperparameterError, match="subject_after"):
            get_editor("nse", subject_after=frames)


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


def test_a_flag_given_as_text_is_a_typed_error():
    """``--set subject_start=False`` (not JSON ``false``) reaches the editor as the string "False"."""
    with pytest.raises(HyperparameterError, match="subject_start='False' must be true or false"):
        get_editor("nse", subject_start="False")


def test_an_unknown_subject_frame_is_a_typed_error():

    with pytest.raises(HyperparameterError, match="subject_frame='both' is not one of kept, batch"):
        get_editor("nse", subject_frame="both")


def test_a_subject_that_is_the_texts_first_token_is_named_in_the_diagnostics(tiny_llama, facts, tmp_path):
    """Without a BOS token a one-token subject opening the prompt sits at position 0 (the attention sink of such
    models): the diagnostics flag that request (``locus_at_text_start``), and when its edit does not take, the
    message says why and what to do; a longer subject is not flagged."""
    import copy

    from tokenizers import processors

    model, tok = tiny_llama
    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")   # no BOS
    two, one = requests(facts, 2)
    one = replace(one, subject=one.subject.split()[0], request_id=one.request_id + "-first-name")
    assert len(tok(two.subject)["input_ids"]) == 2 and len(tok(one.subject)["input_ids"]) == 1
    with pytest.warns(EditDidNotTakeWarning):
        res = get_editor("nse", **{**KW, "stats_dir": str(tmp_path), "subject_key_weight": 3.0, "repasses": 0}
                         ).edit(model, tok, [two, one], None)
    assert not any(d.extra.get("no_op") for d in res.diagnostics)
    at_start = {d.request_id: d.extra["locus_at_text_start"] for d in res.diagnostics}
    assert at_start == {two.request_id: False, one.request_id: True}
    d = res.diagnostics[1]
    assert not d.succeeded and "first token (no BOS token)" in d.message   # it does not take here either
    assert "first token" not in res.diagnostics[0].message


def _edited_again(model, tok, facts, tmp_path, flag: str, w: float, on: Any = True):
    """Batch 1 edits a subject ``a``; from its state, batch 2 edits that subject in another relation (``b``) or a
    subject never edited (``c``). Returns ``a``, ``{flag value: (state 1, result b, result c)}`` for ``flag``
    ``on`` (keyed ``True``) and false, and ``b``'s subject-alone keys in both frames (layer 0's keys do not
    depend on the edits)."""
    spec = spec_for(model)
    every = requests(facts, 36)
    a = every[0]
    b = next(r for r in every if r.subject == a.subject and r.relation != a.relation)
    c = next(r for r in every if r.subject != a.subject)
    runs = {}
    for value in (True, False):
        editor = get_editor("nse", **{**KW, "stats_dir": str(tmp_path), "subject_key_weight": w,
                                      flag: on if value else False})
        s1 = editor.edit(model, tok, [a], None).state
        runs[value] = (s1, editor.edit(model, tok, [b], s1), editor.edit(model, tok, [c], s1))
    alone = [replace(b, prompt="{}")]
    return a, runs, [compute_keys(model, tok, spec, alone, 0, t).double() for t in (("Note that {}",), ("{}",))]


def test_a_subject_edited_again_can_leave_its_subject_alone_keys_to_the_earlier_edit(tiny_llama, facts, tmp_path):
    """``subject_key_again=False``: batch 2 edits a subject of batch 1 in another relation, and that request's
    subject-alone keys are neither fitted nor accumulated. The two runs' moments differ by exactly
    ``w Σ XᵀX`` (X: its subject-alone keys in both frames; layer 0's keys do not depend on the edits); a
    subject never edited before is edited the same way under both settings."""
    model, tok = tiny_llama
    w = 3.0
    name = spec_for(model).mlp_out_name(0)
    _, runs, frames = _edited_again(model, tok, facts, tmp_path, "subject_key_again", w)
    assert torch.equal(runs[True][0].tensors[name + "::C_edits"], runs[False][0].tensors[name + "::C_edits"])
    x = sum(X.T @ X for X in frames)
    diff = runs[True][1].state.tensors[name + "::C_edits"].double() - runs[False][1].state.tensors[name + "::C_edits"].double()
    assert torch.allclose(diff, w * x, atol=1e-4 * float((w * x).abs().max()))
    dw = {k: r[1].delta.dense(name + ".weight") for k, r in runs.items()}
    assert not torch.allclose(dw[True], dw[False])
    assert torch.equal(runs[True][2].delta.dense(name + ".weight"), runs[False][2].delta.dense(name + ".weight"))
    assert runs[False][1].delta.hyperparameters["subject_key_again"] is False


@pytest.mark.parametrize("share", [True, 0.5])
def test_a_subject_edited_again_can_take_its_earlier_subject_alone_hold_out_first(tiny_llama, facts, tmp_path,
                                                                                   share):
    """``release_subject`` (share s; ``true`` is 1): before batch 2 re-edits a subject of batch 1, s of the hold
    batch 1 left at its subject-alone keys (``subject_holds``: w) is taken out of ``C_edits``. Layer 0's keys do
    not depend on the edits, so the two runs' moments after batch 2 differ by exactly ``s w Σ XᵀX``, the re-edit
    moves the subject alone further, and ``subject_holds`` holds the rest of the earlier hold, ``(1 − s) w``, plus
    the re-edit's own weight; a subject never edited before is edited the same way under both settings, float
    rounding apart (batch 1's hold is added once the batch is in)."""
    model, tok = tiny_llama
    w, s = 3.0, float(share)
    name = spec_for(model).mlp_out_name(0)
    a, runs, frames = _edited_again(model, tok, facts, tmp_path, "release_subject", w, on=share)
    assert runs[True][0].meta["subject_holds"] == {a.subject: w}
    x = sum(X.T @ X for X in frames)
    c_edits = {k: r[1].state.tensors[name + "::C_edits"].double() for k, r in runs.items()}
    assert torch.allclose(c_edits[False] - c_edits[True], s * w * x, atol=1e-4 * float((w * x).abs().max()))
    assert runs[True][1].state.meta["subject_holds"] == {a.subject: pytest.approx((1 - s) * w + w)}
    assert runs[False][1].state.meta["subject_holds"] == {}   # only holds taken after their batch are released
    assert runs[True][1].delta.meta["released_subjects"] == [a.subject]

    def moved(res):  # how far the update moves the subject-alone keys
        return float((frames[0] @ res.delta.dense(name + ".weight").double().T).norm())

    assert moved(runs[True][1]) > moved(runs[False][1])
    # batch 1's hold is the same (layer 0's keys do not move with the edit)
    assert torch.allclose(runs[True][0].tensors[name + "::C_edits"], runs[False][0].tensors[name + "::C_edits"],
                          rtol=1e-5, atol=1e-5)

    def apart(i):  # relative distance between the two runs' deltas of batch i
        d = {k: r[i].delta.dense(name + ".weight").double() for k, r in runs.items()}
        return float((d[True] - d[False]).norm() / d[False].norm())

    assert apart(2) < 1e-2 and apart(1) > 10 * apart(2), (apart(1), apart(2))
    assert "released_subjects" not in runs[True][2].delta.meta
    assert runs[True][1].delta.hyperparameters["release_subject"] == s


def test_release_subject_needs_the_subject_alone_keys_it_releases():
    with pytest.raises(HyperparameterError, match="subject_key_weight > 0"):
        get_editor("nse", release_subject=True, subject_key_weight=0.0)
    with pytest.raises(HyperparameterError, match="use one of them"):
        get_editor("nse", release_subject=True, subject_key_again=False)
    for share in (-0.1, 1.5, "half"):
        with pytest.raises(HyperparameterError, match=r"a number in \[0, 1\]"):
            get_editor("nse", release_subject=share, subject_key_weight=1.0)


def test_a_release_larger_than_the_hold_is_cut_at_zero_and_said(tiny_llama, facts, tmp_path, caplog):
    """If the released keys moved since they were held (or the ledger's weight is off), ``C_edits − w Σ XᵀX`` has
    negative directions, which would undo the regulariser: they are cut (the nearest PSD matrix) and the cut is
    logged. Here the state claims ten times the weight batch 1 held."""
    import logging

    model, tok = tiny_llama
    spec = spec_for(model)
    every = requests(facts, 36)
    a = every[0]
    b = next(r for r in every if r.subject == a.subject and r.relation != a.relation)
    editor = get_editor("nse", **{**KW, "stats_dir": str(tmp_path), "subject_key_weight": 3.0,
                                  "release_subject": True})
    s1 = editor.edit(model, tok, [a], None).state
    s1.meta["subject_holds"] = {a.subject: 30.0}
    with caplog.at_level(logging.WARNING, logger="editing.editors.memit"):
        res = editor.edit(model, tok, [b], s1)
    assert any("is cut" in m for m in caplog.messages), caplog.messages
    c = res.state.tensors[spec.mlp_out_name(0) + "::C_edits"].double()
    assert float(torch.linalg.eigvalsh(c).min()) > -1e-4 * float(c.diagonal().max())
    assert res.delta.meta["released_subjects"] == [a.subject]

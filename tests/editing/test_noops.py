"""Requests the model already answers (no-ops) in a batch with real edits.

They are not edited, but the batch's update can still change them: their diagnostics are scored with the
batch's delta applied (a no-op the batch broke is reported as not succeeded, with a message that says so),
and with ``hold_noops`` (default) their keys are held in the solve and accumulated like an edit's own.
"""
from __future__ import annotations

import pytest

from editing.arch import spec_for
from editing.editors import get_editor
from editing.editors.keys import compute_keys
from editing.models import fingerprint
from editing.requests import FactRequest
from tinyworld import NAMES, RELATIONS, assert_held, facts, requests, tiny_llama, top1  # noqa: F401  (fixtures)

KW = {"layers": [0], "locus": "subject", "lam": 30.0, "siblings": 0, "subject_key_weight": 0.0, "corpus": "samples:8",
      "accumulate": True, "value": {"context_templates": ("{}",), "steps": 15}}


def _batch(model, tok, facts):
    """Three edits and every other fact of their relations the model answers, asked for as it stands."""
    edits = requests(facts, 3)
    edited = {(r.subject, r.relation) for r in edits}
    noops = [FactRequest(f"noop-{rel}-{n.replace(' ', '_')}", RELATIONS[rel][0], n, facts[(n, rel)],
                         target_true=facts[(n, rel)], relation=rel)
             for n in NAMES for rel in sorted({r.relation for r in edits}) if (n, rel) not in edited]
    return edits, [r for r in noops if top1(model, tok, r.text, r.target_new)]


def test_noop_diagnostics_say_what_the_edited_model_does(tiny_llama, facts, tmp_path):
    """On this tiny model a layer-0 update moves most prompts of its relations: the no-ops it breaks are
    reported as not succeeded (before, every no-op was reported kept, scored before the edit)."""
    model, tok = tiny_llama
    edits, noops = _batch(model, tok, facts)
    fp = fingerprint(model)
    with pytest.warns(UserWarning, match="did not take"):
        res = get_editor("nse", stats_dir=str(tmp_path), hold_noops=False, **KW).edit(model, tok, [*edits, *noops])
    assert fingerprint(model) == fp
    assert sorted(res.delta.request_ids) == sorted(r.request_id for r in edits)   # no-ops are not edited
    diag = {d.request_id: d for d in res.diagnostics}
    res.delta.apply(model)
    try:
        kept = {r.request_id: top1(model, tok, r.text, r.target_new) for r in noops}
    finally:
        res.delta.remove(model)
    assert all(diag[i].succeeded == k and diag[i].extra["no_op"] for i, k in kept.items())
    broken = [i for i, k in kept.items() if not k]
    assert broken, "the test needs a batch that breaks a no-op"
    assert all("no-op before this batch" in diag[i].message and diag[i].extra["logp_new"]
               < diag[i].extra["logp_new_before"] for i in broken)


def test_held_noops_barely_move_enter_the_ledger_and_never_hold_an_edits_own_key(tiny_llama, facts, tmp_path):
    """Mechanics only: whether holding keeps more no-ops is measured on real models (bench/noop_hold.py; on this
    tiny model's layer 0 the keys of different people are too alike for any hold to separate them)."""
    model, tok = tiny_llama
    spec = spec_for(model)
    edits, noops = _batch(model, tok, facts)
    # every prompt of this world opens with the subject, so at the subject's last token a no-op of an edited
    # person has the subject-alone key that person's edit is fitted to: not held
    shares_key = [r for r in noops if r.subject in {e.subject for e in edits}]
    holdable = [r for r in noops if r not in shares_key]
    assert shares_key and holdable
    batch = [*edits, *noops]
    plain = get_editor("nse", stats_dir=str(tmp_path), hold_noops=False, **KW).edit(model, tok, batch)
    held = get_editor("nse", stats_dir=str(tmp_path), **KW).edit(model, tok, batch)
    assert held.delta.meta["held_noops"] == [r.request_id for r in holdable] and "held_noops" not in plain.delta.meta
    assert_held(plain, held, compute_keys(model, tok, spec, holdable, 0, ("{}",)), spec.mlp_out_name(0))
    ledger = held.state.meta["held_siblings"]   # what release_siblings takes out when such a fact is edited later
    assert all(ledger[r.subject][r.prompt] == 1.0 for r in holdable)

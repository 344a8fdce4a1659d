"""Revert one request from the middle of a line with a real editor (nse on a tiny trained Llama)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "editing"))
from tinyworld import build, requests as make_requests, world  # noqa: E402

from editing.errors import RevertError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    facts = world(0)
    model, tok = build("llama", 4, facts)  # as tests/editing: knows every fact
    d = tmp_path_factory.mktemp("trained") / "llama"
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d, facts


def _hp(tmp):
    return {"layers": [0], "locus": "subject", "lam": 30.0, "value": {"context_templates": ("{}",), "steps": 15},
            "stats_dir": str(tmp), "corpus": "samples:8"}


def _edit_line(reg, line, base, batches, hp):
    from editing.editors import get_editor

    reg.ensure_line(line, base)
    edited = []
    for batch in batches:
        head = reg.latest(line)
        m = reg.materialize(head)
        state = reg.load_state(head, "nse")
        res = get_editor("nse", **hp).edit(m.model, m.tokenizer, batch, state)
        assert all(x > 0 for x in res.delta.norms().values())  # a real, non-empty edit
        edited.append(list(res.delta.request_ids))  # the requests the editor did change (no-ops are left out)
        reg.register_version(line, head.number, res.delta, state=res.state, requests=batch,
                             request_ids=[r.request_id for r in batch], gate_report={"passed": True})
    return reg.latest(line), edited


def _edited(model, names):
    return {n: model.get_submodule(n[: -len(".weight")]).weight.detach().double().clone() for n in names}


def test_replay_revert_equals_the_line_that_never_had_the_request(reg, trained_dir, tmp_path):
    from registry.revert import revert

    base, facts = trained_dir
    reqs = make_requests(facts, 6)
    # a setting too long for the version's tag (names that never come up): the replay rebuilds the editor from
    # the delta's complete hyperparameters, and the revert version records them
    hp = {**_hp(tmp_path), "sibling_exclude": [f"Nobody{i}" for i in range(400)]}
    line = "revert-line"
    batches = [reqs[0:2], reqs[2:4], reqs[4:6]]
    _, edited = _edit_line(reg, line, base, batches, hp)
    gone = edited[1][0]  # a request of the middle batch that the editor really edited
    with pytest.raises(RevertError, match="applied 2 requests together"):
        revert(reg, line, gone, mode="subtract")
    rv = revert(reg, line, gone, who="alice", why="ticket withdrawn")  # editor rebuilt from the version tags
    assert (rv.kind, rv.parent, rv.reverts, rv.tags["editops.revert_of"]) == ("revert", 4, gone, "3")
    assert reg.applied_request_ids(line) == [r.request_id for r in reqs if r.request_id != gone]
    assert reg.version(line, 3).hyperparameters_elided == ["sibling_exclude"]
    assert rv.hyperparameters_elided == ["sibling_exclude"]
    assert reg.load_delta(rv).hyperparameters["sibling_exclude"] == hp["sibling_exclude"]
    with pytest.raises(RevertError, match="already reverted"):
        revert(reg, line, gone)

    scratch, _ = _edit_line(reg, "scratch-line", base, [[r for r in b if r.request_id != gone] for b in batches], hp)
    names = ["model.layers.0.mlp.down_proj.weight"]
    a = _edited(reg.materialize(rv).model, names)
    b = _edited(reg.materialize(scratch).model, names)
    head = _edited(reg.materialize((line, 4)).model, names)
    base_w = _edited(reg.materialize((line, 1)).model, names)
    for n in names:
        err = float((a[n] - b[n]).norm() / (b[n] - base_w[n]).norm())
        change = float((head[n] - a[n]).norm() / (b[n] - base_w[n]).norm())
        print(f"\nreplay revert vs never-edited line: ‖ΔW_revert − ΔW_scratch‖/‖ΔW_scratch‖ = {err:.2e}")
        assert err < 1e-4, (n, err)  # exact to float rounding
        assert change > 1e-2  # and the revert did change the weights
    state_rv = reg.load_state(rv, "nse")
    state_scratch = reg.load_state(scratch, "nse")
    for k, t in state_scratch.tensors.items():
        torch.testing.assert_close(state_rv.tensors[k], t, rtol=1e-4, atol=1e-5)


def test_a_version_whose_recorded_settings_are_refused_says_to_pass_an_editor():
    """A key this editops no longer takes (or a combination it rejects) in a version's recorded hyperparameters:
    the replay cannot rebuild the editor, and the error says to pass one."""
    from registry.revert import _default_editor
    from registry.versions import Version

    v = Version(line="l", number=3, kind="delta", parent=2, base_fingerprint="", editor="nse")
    with pytest.raises(RevertError, match="version 3 .*pass editor="):
        _default_editor(v, {"no_such_setting": 1})
    with pytest.raises(RevertError, match="pass editor="):
        _default_editor(v, {"sibling_leak": 0.3})   # needs sibling_pool or sibling_vocab: a refused combination


def test_subtract_revert_of_a_single_request_batch(reg, line_name, trained_dir, tmp_path):
    from registry.revert import revert

    base, facts = trained_dir
    reqs = make_requests(facts, 3, offset=6)
    _edit_line(reg, line_name, base, [[reqs[0]], [reqs[1]], [reqs[2]]], _hp(tmp_path))
    rv = revert(reg, line_name, reqs[1].request_id, mode="subtract")
    names = ["model.layers.0.mlp.down_proj.weight"]
    got = _edited(reg.materialize(rv).model, names)
    d2, d4 = reg.load_delta(reg.version(line_name, 2)), reg.load_delta(reg.version(line_name, 4))
    want = _edited(reg.materialize((line_name, 1)).model, names)
    for n in names:
        expect = want[n] + d2.dense(n) + d4.dense(n)
        torch.testing.assert_close(got[n], expect, atol=1e-5, rtol=1e-5)
    assert reg.applied_request_ids(line_name) == [reqs[0].request_id, reqs[2].request_id]
    # how far "subtract" is from the line that never had the request (later batches not re-solved)
    scratch, _ = _edit_line(reg, line_name + "-scratch", base, [[reqs[0]], [reqs[2]]], _hp(tmp_path))
    b = _edited(reg.materialize(scratch).model, names)
    for n in names:
        rel = float((got[n] - b[n]).norm() / (b[n] - want[n]).norm())
        print(f"\nsubtract revert vs never-edited line: relative weight difference {rel:.2e}")
        assert rel < 1.0  # closer to the right line than to nothing; not exact by design


def test_hook_deltas_materialise_in_order_and_refuse_weight_exports(reg, line_name, trained_dir, tmp_path):
    from tinyworld import FILLER

    from editing.editors import get_editor
    from editing.errors import ExportError
    from editing.models import load
    from registry.export import export_merged, export_peft

    base, facts = trained_dir
    corpus = tmp_path / "filler.txt"
    corpus.write_text("\n".join(FILLER) + "\n")
    hp = dict(layers=[0], lam=10.0, context_templates=["{}"], stats_dir=str(tmp_path / "stats"),
              corpus=f"samples:64+file:{corpus}", reference_corpus=f"file:{corpus}")
    reg.ensure_line(line_name, base)
    reqs = make_requests(facts, 2, offset=10)
    expected = load(base)
    for i, r in enumerate(reqs):
        head = reg.latest(line_name)
        m = reg.materialize(head)
        res = get_editor("hook", **hp).edit(m.model, m.tokenizer, [r], reg.load_state(head, "hook"))
        assert res.delta.kind == "hook"
        reg.register_version(line_name, head.number, res.delta, state=res.state, requests=[r])
        res.delta.apply(expected.model)
    model, tok = reg.load(f"models:/{line_name}/3")
    ids = tok(reqs[0].text, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, expected.model(**ids).logits, atol=1e-5, rtol=1e-5)
    assert reg.version(line_name, 3).delta_kind == "hook"
    with pytest.raises(ExportError, match="hook deltas"):
        export_merged(reg, f"models:/{line_name}/3", tmp_path / "m")
    with pytest.raises(ExportError, match="hook deltas"):
        export_peft(reg, f"models:/{line_name}/3", tmp_path / "p")

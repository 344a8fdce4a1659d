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
    return {"layers": [0], "lam": 30.0, "value": {"context_templates": ("{}",), "steps": 15},
            "stats_dir": str(tmp), "corpus": "samples:8"}


def _edit_line(reg, line, base, batches, hp):
    from editing.editors import get_editor

    reg.ensure_line(line, base)
    for batch in batches:
        head = reg.latest(line)
        m = reg.materialize(head)
        state = reg.load_state(head, "nse")
        res = get_editor("nse", **hp).edit(m.model, m.tokenizer, batch, state)
        assert all(x > 0 for x in res.delta.norms().values())  # a real, non-empty edit
        reg.register_version(line, head.number, res.delta, state=res.state, requests=batch,
                             gate_report={"passed": True})
    return reg.latest(line)


def _edited(model, names):
    return {n: model.get_submodule(n[: -len(".weight")]).weight.detach().double().clone() for n in names}


def test_replay_revert_equals_the_line_that_never_had_the_request(reg, trained_dir, tmp_path):
    from registry.revert import revert

    base, facts = trained_dir
    reqs = make_requests(facts, 6)
    hp = _hp(tmp_path)
    line = "revert-line"
    _edit_line(reg, line, base, [reqs[0:2], reqs[2:4], reqs[4:6]], hp)
    gone = reqs[2].request_id
    print("DBG", [(v.number, v.kind, v.request_ids, v.n_requests) for v in reg.versions(line)])
    with pytest.raises(RevertError, match="applied 2 requests together"):
        revert(reg, line, gone, mode="subtract")
    rv = revert(reg, line, gone, who="alice", why="ticket withdrawn")  # editor rebuilt from the version tags
    assert (rv.kind, rv.parent, rv.reverts, rv.tags["editops.revert_of"]) == ("revert", 4, gone, "3")
    ids = [r.request_id for r in reqs]
    assert reg.applied_request_ids(line) == [ids[0], ids[1], ids[3], ids[4], ids[5]]
    with pytest.raises(RevertError, match="already reverted"):
        revert(reg, line, gone)

    scratch = _edit_line(reg, "scratch-line", base, [reqs[0:2], [reqs[3]], reqs[4:6]], hp)
    names = ["model.layers.0.mlp.down_proj.weight"]
    a = _edited(reg.materialize(rv).model, names)
    b = _edited(reg.materialize(scratch).model, names)
    head = _edited(reg.materialize((line, 4)).model, names)
    base_w = _edited(reg.materialize((line, 1)).model, names)
    for n in names:
        err = float((a[n] - b[n]).norm() / (b[n] - base_w[n]).norm())
        change = float((head[n] - a[n]).norm() / (b[n] - base_w[n]).norm())
        assert err < 1e-4, (n, err)  # exact to float rounding
        assert change > 1e-2  # and the revert did change the weights
    state_rv = reg.load_state(rv, "nse")
    state_scratch = reg.load_state(scratch, "nse")
    for k, t in state_scratch.tensors.items():
        torch.testing.assert_close(state_rv.tensors[k], t, rtol=1e-4, atol=1e-5)


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

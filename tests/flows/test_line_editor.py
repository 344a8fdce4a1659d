"""A line's editor: the relations it holds from the first batch on, and settings it refuses."""
from __future__ import annotations

import json

from flowkit import FAST_NSE, OPEN_GATES, fact_tickets, make_project


def _queue(cfg, reqs, name: str = "tickets") -> None:
    (cfg.inbox / f"{name}.json").write_text(json.dumps(fact_tickets(reqs)))


def test_a_line_holds_every_queued_tickets_relation_from_its_first_batch(tmp_path, tiny_model_dir):
    """A fact line whose editor holds other prompts (``other_prompts``) holds every prompt of its queued tickets
    from the first batch on (recorded on the first version); ``hold_relations: false`` holds only what the batch
    edits."""
    from flows.pipeline import open_registry, run_once

    model_dir, reqs = tiny_model_dir
    picked = [next(r for r in reqs if r.relation == rel) for rel in dict.fromkeys(r.relation for r in reqs)][:3]
    assert len({r.prompt for r in picked}) == 3
    held = {}
    for hold in (None, False):
        cfg = make_project(tmp_path / f"proj-{hold}", base_model=str(model_dir), batch_size=1, promotion="auto",
                           gates=OPEN_GATES, hold_relations=hold,
                           hyperparameters={**FAST_NSE, "other_prompts": 2, "stats_dir": str(tmp_path / "stats")})
        _queue(cfg, picked)
        run_once(cfg, engine="local", say=lambda *_: None)
        first = next(v for v in open_registry(cfg).versions("facts") if not v.is_base)
        assert sorted(first.request_ids) == [picked[0].request_id]
        held[hold] = first.hyperparameters["relation_prompts"]
    assert held[None] == {r.prompt: r.relation for r in picked}
    assert held[False] is None


def test_a_line_whose_editor_settings_are_refused_keeps_its_tickets_queued(tmp_path, tiny_model_dir):
    """An unknown hyperparameter, or ``hold_relations: true`` where the editor holds no other prompts, fails the
    line's run with the reason; no ticket is rejected or lost, and the run after the fix applies them."""
    from flows.ledger import Ledger
    from flows.pipeline import run_once

    model_dir, reqs = tiny_model_dir
    kw = dict(base_model=str(model_dir), batch_size=2, promotion="auto", gates=OPEN_GATES)
    good = {**FAST_NSE, "stats_dir": str(tmp_path / "stats")}
    root = tmp_path / "proj"
    for bad, says in (({"hyperparameters": {**good, "lamm": 3.0}}, "lamm"),
                      ({"hyperparameters": good, "hold_relations": True}, "other_prompts")):
        cfg = make_project(root, **kw, **bad)
        _queue(cfg, reqs[:2], name="first")
        rep = run_once(cfg, engine="local", say=lambda *_: None)
        (line,) = [lr for lr in rep.lines if lr.line == "facts"]
        assert line.errors and says in line.errors[0] and not line.applied and not line.rejected
        states = {row.id: row.state for row in Ledger(cfg.ledger_url).rows(line="facts")}
        assert states == {r.request_id: "queued" for r in reqs[:2]}
    cfg = make_project(root, **kw, hyperparameters=good)
    rep = run_once(cfg, engine="local", say=lambda *_: None)
    states = {row.id: row.state for row in Ledger(cfg.ledger_url).rows(line="facts")}
    assert states == {r.request_id: "applied" for r in reqs[:2]}

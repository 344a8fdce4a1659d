"""Exactly once: kill the process at each step, run again; two runs at once never fork a line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flowkit import check_exactly_once, editops, fact_tickets
from flows.ledger import Ledger
from flows.pipeline import KILL_EXIT_CODE, open_registry


@pytest.mark.slow
def test_kill_at_each_step_then_rerun(editable_project):
    cfg, reqs = editable_project
    ids = [r.request_id for r in reqs[:4]]
    (cfg.inbox / "t.json").write_text(json.dumps(fact_tickets(reqs[:4])))
    for step in ("after_edit", "after_register", "before_ledger"):
        p = editops(cfg, "run", "--engine", "local", env={"EDITOPS_KILL_AT": step})
        assert p.returncode == KILL_EXIT_CODE, (step, p.stdout[-2000:], p.stderr[-3000:])
    led = Ledger(cfg.ledger_url)
    reg = open_registry(cfg)
    # killed after registering twice: two versions exist; the third run's start reconciled the first of them
    assert len(reg.versions("facts")) == 1 + 2
    assert [r.id for r in led.rows(line="facts", state="applied")] == reg.versions("facts")[1].request_ids
    p = editops(cfg, "run", "--engine", "local")
    assert p.returncode == 0, p.stderr[-3000:]
    check_exactly_once(cfg, ids)
    reg = open_registry(cfg)
    assert len(reg.versions("facts")) == 1 + 4
    reconciled = [r for r in ids if any(s == "applied" and d is not None for s, _, d in led.history(r))]
    assert len(reconciled) >= 2
    # outbox says applied too
    out = {json.loads(p.read_text())["id"]: json.loads(p.read_text()) for p in cfg.outbox.glob("*.json")}
    assert all(out[i]["state"] == "applied" for i in ids)


@pytest.mark.slow
@pytest.mark.parametrize("lock", [True, False], ids=["line-lease", "registry-cas-only"])
def test_two_runs_at_once_do_not_fork(editable_project, lock):
    cfg, reqs = editable_project
    ids = [r.request_id for r in reqs[4:8]]
    from flows.intake import scan_inbox

    (cfg.inbox / "t.json").write_text(json.dumps(fact_tickets(reqs[4:8])))
    scan_inbox(cfg, Ledger(cfg.ledger_url))
    # the MLflow store and the line are not created beforehand: both processes start on a fresh store
    env = {} if lock else {"EDITOPS_NO_LINE_LOCK": "1"}
    import os

    procs = [subprocess.Popen([sys.executable, "-c", "from flows.cli import main; main()", "run", "--engine", "local",
                               "--lock-wait", "120", "--config", str(cfg.root / "editops.yaml")],
                              cwd=cfg.root, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    check_exactly_once(cfg, ids)


@pytest.mark.slow
@pytest.mark.postgres
def test_team_mode_two_workers_one_inbox_postgres_ledger(postgres_project):
    """Two worker processes drain one inbox; the ledger is a real PostgreSQL; nothing applied twice."""
    import os

    cfg, reqs, url = postgres_project
    ids = [r.request_id for r in reqs[8:12]]
    for k in range(2):  # two files in one inbox
        (cfg.inbox / f"f{k}.json").write_text(json.dumps(fact_tickets(reqs[8 + 2 * k: 10 + 2 * k])))
    open_registry(cfg).ensure_line("facts", cfg.lines["facts"].base_model)
    procs = [subprocess.Popen([sys.executable, "-c", "from flows.cli import main; main()", "run", "--engine", "local",
                               "--lock-wait", "120", "--config", str(cfg.root / "editops.yaml")], cwd=cfg.root,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    check_exactly_once(cfg, ids)
    assert Ledger(url).counts() == {"applied": 4}

"""The real Prefect flow (test harness server) and a schedule that fires (`editops serve`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flowkit import fact_tickets
from flows.ledger import Ledger


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.mark.server
@pytest.mark.slow
def test_flow_run_with_artifact_and_mlflow_report(editable_project, prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import open_registry, process_requests

    cfg, reqs = editable_project
    (cfg.inbox / "a.json").write_text(json.dumps(fact_tickets(reqs[:2]) + [{"request_id": "junk"}]))
    out = process_requests(config=str(cfg.root / "editops.yaml"))
    line = out["lines"][0]
    assert sorted(line["applied"]) == sorted(r.request_id for r in reqs[:2]) and line["promoted"] == 3
    led = Ledger(cfg.ledger_url)
    assert led.counts() == {"applied": 2, "invalid": 1}

    async def artifacts():
        async with get_client() as c:
            return await c.read_artifacts()

    arts = [a for a in asyncio.run(artifacts()) if a.key == "editops-run-report"]
    assert arts and "Line `facts`" in arts[0].data
    reg = open_registry(cfg)
    from registry.reports import gate_figures, gate_report

    for v in reg.versions("facts")[1:]:  # each version's measured gate figures, as registered
        figs = gate_figures(gate_report(reg, v))
        assert figs and all(f.short() in arts[0].data for f in figs), arts[0].data
    runs = reg.client.search_runs([reg.experiment_id("editops-pipeline")])
    assert runs and runs[0].data.metrics["applied"] == 2.0
    assert reg.alias_version("facts", "champion") == 3


@pytest.fixture(scope="module")
def prefect_real_server(tmp_path_factory):
    """`prefect server start` on a free 127.0.0.1 port, with its scheduler (the harness server has no services)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "3", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": ""}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except Exception:  # noqa: BLE001
            assert proc.poll() is None, "prefect server exited"
            time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _flow_runs(api_url: str, deployment: str):
    """The deployment (with its schedules) and its flow runs, read from the Prefect server."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as c:
            dep = await c.read_deployment_by_name(deployment)
            runs = await c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            return dep, runs

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(read())


# a six-field cron (trailing seconds field, croniter's convention; Prefect 3.8 accepts it) fires within 10 s
SCHEDULES = {"interval": ["--interval", "10"], "cron": ["--cron", "* * * * * */10"]}


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_serve_schedule_fires(editable_project, prefect_real_server, kind):
    """`editops serve` with a schedule: a run the server's scheduler created processes the inbox."""
    cfg, reqs = editable_project
    from flows.pipeline import open_registry

    open_registry(cfg).ensure_line("facts", cfg.lines["facts"].base_model)  # the MLflow store exists before runs
    (cfg.inbox / "s.json").write_text(json.dumps(fact_tickets(reqs[2:3]) + [{"request_id": "bad one"}]))
    env = {**os.environ, "PREFECT_API_URL": prefect_real_server, "OMP_NUM_THREADS": "1"}
    log = cfg.root / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", "from flows.cli import main; main()", "serve",
                                 *SCHEDULES[kind], "--name", f"test-{kind}", "--config", str(cfg.root / "editops.yaml")],
                                cwd=cfg.root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    led = Ledger(cfg.ledger_url)
    rid = reqs[2].request_id
    timeout = 240
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            row = led.get(rid)
            if row is not None and row.state in ("applied", "rejected"):
                break
            assert proc.poll() is None, f"`editops serve {' '.join(SCHEDULES[kind])}` exited:\n{log.read_text()[-3000:]}"
            time.sleep(2)
        row = led.get(rid)
        assert row is not None and row.state == "applied", (
            f"no scheduled run ({kind} {SCHEDULES[kind][1]!r}) applied ticket {rid} within {timeout} s; ledger state: "
            f"{row.state if row else 'not in the ledger'}; serve log:\n{log.read_text()[-3000:]}")
        assert led.counts().get("invalid") == 1
        # the flow updates the ledger before it reports its own end to the server: wait for that report
        report_deadline = time.time() + 60
        while True:
            dep, runs = _flow_runs(prefect_real_server, f"process_requests/editops-test-{kind}")
            done = [r for r in runs if r.state is not None and r.state.is_completed()]
            if done or time.time() > report_deadline:
                break
            time.sleep(2)
        sched = dep.schedules[0].schedule
        assert (sched.cron == SCHEDULES[kind][1]) if kind == "cron" else (sched.interval.total_seconds() == 10.0)
        assert done and all(r.auto_scheduled for r in done), [(r.name, r.auto_scheduled, r.state) for r in runs]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_refuses_without_a_prefect_server(project):
    """Without PREFECT_API_URL Prefect's temporary server has no scheduler: serve says so instead of idling."""
    from flowkit import editops

    p = editops(project, "serve", "--cron", "*/5 * * * *", env={"PREFECT_API_URL": ""}, timeout=120)
    assert p.returncode == 2 and "prefect server start" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = editops(project, "serve", "--cron", "61 * * * *", env={"PREFECT_API_URL": "http://127.0.0.1:9/api"},
                timeout=120)
    assert p.returncode == 2 and "is not a cron schedule" in p.stderr, p.stderr

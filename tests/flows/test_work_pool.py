"""Team mode with Prefect workers on 127.0.0.1 (issue 6 item 7).

A real ``prefect server``, a process work pool, ``process_requests`` deployed to it with
``flows.deploy.deploy_to_pool``, two ``prefect worker`` processes, one inbox, the ledger in a
real PostgreSQL: every ticket is applied exactly once on a straight lineage.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from flowkit import check_exactly_once, fact_tickets
from flows.ledger import Ledger
from flows.pipeline import open_registry

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "editops-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A child in its own process group (so the whole group can be killed), output to ``log``."""
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL it if still there after 10 s."""
    if p.poll() is None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy in {timeout}s: {log.read_text()[-3000:]}")


def _cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-3000:])
    return p


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.postgres
def test_two_prefect_workers_drain_one_inbox_exactly_once(postgres_project, tmp_path):
    cfg, reqs, url = postgres_project
    config_path = str(cfg.root / "editops.yaml")
    ids = [r.request_id for r in reqs[:4]]
    for k in range(2):  # two files in one inbox
        (cfg.inbox / f"f{k}.json").write_text(json.dumps(fact_tickets(reqs[2 * k: 2 * k + 2])))
    open_registry(cfg).ensure_line("facts", cfg.lines["facts"].base_model)

    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", api.split(":")[2][:-4],
                     "--no-ui"], env, logs / "server.log")
    workers: list[subprocess.Popen] = []
    try:
        _wait_healthy(api, server, logs / "server.log")
        _cli([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], env)
        _cli([sys.executable, "-c", "from flows.deploy import deploy_to_pool; "
              f"deploy_to_pool({POOL!r}, {config_path!r}, source={str(ROOT)!r})"], env)
        workers = [_start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", f"w{k}", "--limit", "1"],
                          env, logs / f"worker{k}.log") for k in range(2)]
        runs = _trigger_and_wait(env, n=3, timeout=240, logs=logs)
    finally:
        for w in workers:  # workers before the server (they ignore SIGTERM while the API is gone)
            _stop(w)
        _stop(server)

    bad = [r for r in runs if r["state"] != "COMPLETED"]
    assert not bad, (bad, *(f.read_text()[-2000:] for f in sorted(logs.glob("worker*.log"))))
    check_exactly_once(cfg, ids)
    assert Ledger(url).counts() == {"applied": 4}
    by = {r["worker"] for r in runs}
    assert by <= {"w0", "w1"}, by  # Prefect labels every run with the worker that executed it: one of ours
    print(f"flow runs per worker: { {w: sum(r['worker'] == w for r in runs) for w in sorted(by)} }")
    if len(by) < 2:  # scheduling is Prefect's choice; exactly-once above is the property under test
        warnings.warn(f"only worker {by} picked flow runs this time; exactly-once still holds")


def _trigger_and_wait(env: dict, n: int, timeout: float, logs: Path) -> list[dict]:
    """Create ``n`` flow runs of the deployment (2 tickets each at most), wait until all are final.

    Runs in a child so that this process's Prefect settings (other tests use a temporary server)
    are not touched. Returns [{id, state, worker}] where ``worker`` is the ``prefect.worker.name``
    label the worker gave the flow run."""
    script = f"""
import json, time
from prefect import get_client
from prefect.deployments import run_deployment
ids = [str(run_deployment("process_requests/editops-pool", parameters={{"max_tickets": 2}}, timeout=0).id)
       for _ in range({n})]
deadline = time.monotonic() + {timeout}
with get_client(sync_client=True) as c:
    while True:
        runs = [c.read_flow_run(i) for i in ids]
        if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            break
        time.sleep(2)
print(json.dumps([{{"id": str(r.id), "state": r.state.type.value if r.state else None,
                   "worker": (r.labels or {{}}).get("prefect.worker.name")}} for r in runs]))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout + 60)
    assert p.returncode == 0, (p.stderr[-3000:], *(f.read_text()[-2000:] for f in sorted(logs.glob("worker*.log"))))
    return json.loads(p.stdout.strip().splitlines()[-1])

"""Schedules: ``editops serve`` serves the ``process_requests`` flow as a Prefect deployment.

``serve(cron=... | interval=...)`` registers a deployment named ``editops-<name>``
with the schedule and blocks, running each scheduled flow run in this process
(Prefect's ``flow.serve``). Schedules need a Prefect server: its scheduler service
creates the scheduled runs, and the temporary server Prefect starts when no
``PREFECT_API_URL`` is set runs no scheduler, so ``serve`` refuses to start without one::

    prefect server start --host 127.0.0.1                      # in another terminal (or as a service)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    editops serve --cron "*/15 * * * *"                        # or --interval 600

A cron string has five fields, or six with a trailing seconds field (croniter's
convention, which Prefect 3.8 accepts: ``"* * * * * */30"`` = every 30 seconds).
Team mode with workers instead of ``serve`` (these exact steps are
what ``tests/flows/test_work_pool.py`` runs on 127.0.0.1, with the ledger in PostgreSQL)::

    prefect server start --host 127.0.0.1 --port 4200          # once; everyone: PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect work-pool create editops --type process
    python -c "from flows.deploy import deploy_to_pool; deploy_to_pool('editops', '/abs/path/editops.yaml', source='/abs/path/to/editops')"
    prefect worker start --pool editops --limit 1             # on each machine; the ledger lease keeps lines exclusive
    python -c "from prefect.deployments import run_deployment; run_deployment('process_requests/editops-pool', timeout=0)"
                                                              # or: prefect deployment run process_requests/editops-pool

``source`` is a directory holding this project's code at the same path on every worker machine
(``flow.from_source`` with a local path: the worker runs the flow there); the config's ledger must
be a shared SQLAlchemy URL (PostgreSQL) and its tracking URI a shared MLflow server.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from editing.errors import EditopsError


def _schedule_kwargs(cron: str | None, interval: float | None) -> dict[str, Any]:
    if cron and interval:
        raise EditopsError("give either --cron or --interval, not both")
    if cron:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError as exc:
            raise EditopsError(f"--cron {cron!r} is not a cron schedule: give five fields (minute hour day month "
                               "weekday, e.g. '*/15 * * * *') or six with a trailing seconds field") from exc
        return {"cron": cron}
    if interval:
        if interval <= 0:
            raise EditopsError("--interval must be a positive number of seconds")
        return {"interval": timedelta(seconds=float(interval))}
    raise EditopsError("give a schedule: --cron '*/5 * * * *' or --interval SECONDS")


def serve(config: str | None = None, *, cron: str | None = None, interval: float | None = None,
          name: str = "scheduled", lock_wait_s: float = 0.0) -> None:
    """Serve ``process_requests`` on a schedule (blocks until interrupted); needs ``PREFECT_API_URL``."""
    kwargs = _schedule_kwargs(cron, interval)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise EditopsError(
            "a schedule needs a Prefect server (the temporary one Prefect starts without PREFECT_API_URL has no "
            "scheduler, so no run would ever fire): start one with `prefect server start --host 127.0.0.1`, "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, and run `editops serve` again")
    from flows.pipeline import process_requests

    process_requests.serve(
        name=f"editops-{name}", parameters={"config": config, "lock_wait_s": lock_wait_s},
        description="editops: process the inbox and every queued ticket", **kwargs,
    )


def deploy_to_pool(pool: str, config: str, *, name: str = "pool", cron: str | None = None,
                   interval: float | None = None, source: str = ".") -> Any:
    """Create a deployment of ``process_requests`` on a process work pool (team mode; workers run it)."""
    from prefect import flow as _flow

    kwargs = _schedule_kwargs(cron, interval) if (cron or interval) else {}
    remote = _flow.from_source(source=source, entrypoint="flows/pipeline.py:process_requests")
    return remote.deploy(name=f"editops-{name}", work_pool_name=pool, parameters={"config": config,
                                                                                   "lock_wait_s": 30.0}, **kwargs)

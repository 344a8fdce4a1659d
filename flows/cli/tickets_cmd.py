"""``editops submit | tickets | run | serve | demo``: tickets in, the flow, its schedule, the demo."""
from __future__ import annotations

from typing import Optional

import typer

from flows.cli.app import app

CONFIG = typer.Option(None, "--config", "-c", help="editops.yaml (default: $EDITOPS_CONFIG or ./editops.yaml)")


@app.command()
def submit(path: str = typer.Argument(..., help="ticket file: JSON, JSONL, CSV or YAML"), config: Optional[str] = CONFIG):
    """Validate a ticket file now and queue its valid rows (invalid rows are quarantined with reasons)."""
    from rich.console import Console

    from flows.config import load_config
    from flows.intake import submit_file
    from flows.ledger import Ledger

    cfg = load_config(config)
    r = submit_file(path, cfg, Ledger(cfg.ledger_url))
    con = Console()
    con.print(f"[green]{len(r.queued)} queued[/], {len(r.same)} already known, "
              f"[{'red' if r.invalid else 'green'}]{len(r.invalid)} invalid[/]")
    for e in r.invalid:
        reasons = "; ".join(f"{x.get('field') or '-'}: {x['check']}" for x in e["reasons"])
        con.print(f"  row {e['row']} ({e.get('request_id') or '?'}): {reasons}", highlight=False)
    if r.quarantine_file:
        con.print(f"quarantined rows: {r.quarantine_file}")


@app.command()
def tickets(config: Optional[str] = CONFIG, state: Optional[str] = typer.Option(None, help="only this state"),
            line: Optional[str] = typer.Option(None, help="only this model line"),
            limit: int = typer.Option(200, help="rows to show")):
    """The ledger as a table: every ticket's state, version and reasons."""
    from rich.console import Console
    from rich.table import Table

    from flows.config import load_config
    from flows.ledger import Ledger

    cfg = load_config(config)
    led = Ledger(cfg.ledger_url)
    rows = led.rows(line=line, state=state)
    t = Table(title=f"tickets ({', '.join(f'{k} {v}' for k, v in sorted(led.counts().items()))})")
    for col in ("id", "line", "requester", "state", "version", "why", "updated (UTC)"):
        # long ids, lines and reasons wrap (fold) instead of being cut off in a narrow terminal
        t.add_column(col, overflow="fold" if col in ("id", "line", "why") else "ellipsis")
    colour = {"applied": "green", "rejected": "red", "invalid": "magenta", "queued": "yellow"}
    for r in rows[:limit]:
        why = ""
        if r.state == "invalid" and r.reasons:
            why = "; ".join(f"{x.get('field') or '-'}:{x.get('check')}" for x in r.reasons)[:70]
        elif r.state == "rejected" and r.metrics:
            why = "; ".join(f"{g['gate']}={g['metric']:.2f}" for g in r.metrics
                            if g.get("verdict") == "fail" and g.get("metric") is not None)[:70] or "edit failed"
        t.add_row(r.id[:40], r.line or "", r.requester or "", f"[{colour.get(r.state, 'white')}]{r.state}[/]",
                  str(r.version or ""), why, (r.updated_at or r.received_at).strftime("%Y-%m-%d %H:%M:%S"))
    Console().print(t)


@app.command()
def run(config: Optional[str] = CONFIG,
        engine: str = typer.Option("prefect", help="prefect (a flow run) or local (same steps, no Prefect)"),
        line: Optional[list[str]] = typer.Option(None, help="only these lines"),
        max_tickets: Optional[int] = typer.Option(None, help="at most this many tickets per line"),
        lock_wait: float = typer.Option(0.0, help="seconds to wait for a line another run holds")):
    """Process the inbox and all queued tickets once (edit → gates → register → ledger → promote)."""
    from rich.console import Console

    from flows.pipeline import run_once

    out = run_once(config, engine=engine, lines=line, max_tickets=max_tickets, lock_wait_s=lock_wait)
    md = out.to_markdown() if hasattr(out, "to_markdown") else None
    if md is None:
        from flows.pipeline import RunReport, LineReport, Timings

        lines = [LineReport(**{**l, "timings": Timings(**l["timings"])}) for l in out["lines"]]
        md = RunReport(intake=out["intake"], lines=lines, timings=Timings(**out["timings"])).to_markdown()
    from rich.markdown import Markdown

    Console().print(Markdown(md))


@app.command()
def serve(config: Optional[str] = CONFIG,
          cron: Optional[str] = typer.Option(None, help="cron schedule: 5 fields ('*/15 * * * *'), or 6 with trailing "
                                                        "seconds ('* * * * * */30')"),
          interval: Optional[float] = typer.Option(None, help="every N seconds"),
          name: str = typer.Option("scheduled", help="deployment name suffix"),
          lock_wait: float = typer.Option(0.0, help="seconds to wait for a busy line")):
    """Serve the flow as a Prefect deployment on a cron or interval schedule (blocks; needs PREFECT_API_URL,
    i.e. a `prefect server start`: its scheduler creates the runs)."""
    from pathlib import Path

    from flows.deploy import serve as _serve

    cfg_path = str(Path(config).resolve()) if config else None
    _serve(cfg_path, cron=cron, interval=interval, name=name, lock_wait_s=lock_wait)


@app.command()
def demo(workdir: str = typer.Option(".editops/demo", help="where the demo keeps its ledger, MLflow and inbox"),
         skip_build: bool = typer.Option(False, help="do not run `dvc repro` for missing models"),
         facts: int = typer.Option(6, help="country-fact tickets for SmolLM2"),
         deletions: int = typer.Option(3, help="behaviour-deletion tickets for the translation model"),
         engine: str = typer.Option("prefect", help="prefect or local")):
    """The whole story on the project's models: tickets → flow → ledger → versions → promotion."""
    from flows.demo import run_demo

    run_demo(workdir=workdir, build=not skip_build, n_facts=facts, n_deletions=deletions, engine=engine)

"""Registry commands: ``editops versions | show | diff | promote | rollback | revert | export``.

Every command takes ``--tracking-uri`` or ``--config``. The registry used is the first of:
``--tracking-uri`` / ``$EDITOPS_TRACKING_URI``; the project config's (``--config`` /
``$EDITOPS_CONFIG``); ``$MLFLOW_TRACKING_URI``; ``./editops.yaml``'s when present; the
embedded ``sqlite:///.editops/mlflow.db``.
A version is named ``models:/<line>/<n>``, ``models:/<line>@<alias>`` or
``<line>/<n>`` / ``<line>@<alias>``. Basic-auth credentials come only from
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from flows.cli.app import app

TRACKING_HELP = "MLflow tracking URI (http://host:port, sqlite:///..., postgresql://...); default: embedded .editops"
_uri_opt = typer.Option(None, "--tracking-uri", envvar="EDITOPS_TRACKING_URI", help=TRACKING_HELP)
_home_opt = typer.Option(None, "--home", envvar="EDITOPS_HOME", help="editops working dir (default ./.editops)")
_cfg_opt = typer.Option(None, "--config", "-c", help="editops.yaml whose registry to use (default: $EDITOPS_CONFIG "
                        "or ./editops.yaml when present; --tracking-uri overrides it)")
_who_opt = typer.Option(None, "--who", help="who is acting (default $EDITOPS_USER or the OS user)")


def _registry(tracking_uri: str | None, home: Path | None, config: str | None = None):
    """The registry named by ``--tracking-uri``; else by the project config (its tracking URI, artifact
    root and workdir); else the default (module docstring gives the order)."""
    import os

    from registry import Registry

    if tracking_uri is None and (config or os.environ.get("EDITOPS_CONFIG") or (
            not os.environ.get("MLFLOW_TRACKING_URI") and Path("editops.yaml").is_file())):
        from flows.config import load_config

        cfg = load_config(config)
        return Registry(cfg.tracking_uri, cfg.registry_uri, str(cfg.artifact_root) if cfg.artifact_root else None,
                        home=home or cfg.workdir)
    return Registry(tracking_uri, home=home)


def _ref(text: str) -> str:
    return text if text.startswith("models:/") else f"models:/{text}"


def _console():
    from rich.console import Console

    return Console()


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M") if ms else ""


@app.command()
def versions(line: Optional[str] = typer.Argument(None, help="model line; omit to list the lines"),
             tracking_uri: Optional[str] = _uri_opt, home: Optional[Path] = _home_opt, config: Optional[str] = _cfg_opt,
             as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """List a line's versions (or all lines): gate figures and verdicts, diff against the parent, aliases."""
    from rich.table import Table

    reg = _registry(tracking_uri, home, config)
    if line is None:
        names = reg.lines()
        if as_json:
            print(json.dumps(names))
            return
        t = Table(title=f"lines in {reg.config.tracking_uri}")
        for col in ("line", "versions", "head", "champion", "candidate"):
            t.add_column(col)
        for n in names:
            vs = reg.versions(n)
            t.add_row(n, str(len(vs)), str(vs[-1].number), str(reg.alias_version(n, "champion") or ""),
                      str(reg.alias_version(n, "candidate") or ""))
        _console().print(t)
        return
    if as_json:
        from registry.reports import version_report

        print(json.dumps([version_report(reg, v) for v in reg.versions(line)], default=str))
        return
    _console().print(versions_table(reg, line))


def _diff_parts(d: dict | None) -> list[str]:
    """A :func:`registry.reports.diff_summary` as text: the weights part, then the probes part if any probes ran."""
    if d is None:
        return []
    parts = [f"{d['weights']} weight(s), ‖ΔW‖ {d['total_norm']:.3g}, rank ≤ {d['max_rank']}"]
    if d["probes"]:
        parts.append(f"probes changed {d['changed']}/{d['probes']}")
    return parts


def versions_table(reg, line: str):
    """A line's versions as a rich table: lineage, editor, tickets, each gate's measured figure and
    verdict (from the version's ``gate_report.json``), its diff against the parent (``diff.json``: edited
    weights, total ‖ΔW‖_F, largest rank, probes whose top answer changed), aliases, size, time."""
    from rich.table import Table

    from registry.reports import diff_summary, gate_figures, gate_report, version_diff

    t = Table(title=line)
    for col in ("version", "kind", "parent", "editor", "tickets", "gates", "diff vs parent", "aliases", "delta bytes",
                "created (UTC)"):
        t.add_column(col, justify="right" if col in ("version", "parent", "delta bytes") else "left")
    for v in reg.versions(line):
        verdict = {True: "[green]pass[/]", False: "[red]fail[/]", None: ""}[v.gates_passed]
        figs = gate_figures(gate_report(reg, v)) if not v.is_base else []
        gates = "\n".join([verdict, *(f.short() for f in figs)]).strip()
        d = diff_summary(version_diff(reg, v)) if not v.is_base else None
        diff = "\n".join(_diff_parts(d))
        kind = v.kind if v.kind != "revert" else f"revert {v.reverts}"
        t.add_row(str(v.number), kind, "" if v.parent is None else str(v.parent), v.editor or "", str(v.n_requests), gates, diff,
                  ", ".join(sorted(v.aliases)), v.tags.get("editops.delta_bytes", ""), _when(v.created_ms))
    return t


def version_lines(reg, line: str) -> list[str]:
    """The same facts as :func:`versions_table`, one short paragraph per version (wraps in any terminal width)."""
    from registry.reports import diff_summary, gate_figures, gate_report, version_diff

    out = []
    for v in reg.versions(line):
        aliases = f" ({', '.join(sorted(v.aliases))})" if v.aliases else ""  # not [..]: rich markup
        if v.is_base:
            out.append(f"v{v.number} base{aliases}")
            continue
        verdict = {True: "[green]gates pass[/]", False: "[red]gates fail[/]", None: "no gates"}[v.gates_passed]
        figs = " · ".join(f.short() for f in gate_figures(gate_report(reg, v)))
        d = diff_summary(version_diff(reg, v))
        diff = f"\n    diff vs v{v.parent}: " + ", ".join(_diff_parts(d)) if d is not None else ""
        kind = "" if v.kind == "delta" else f" {v.kind}" + (f" of {v.reverts}" if v.kind == "revert" else "")
        out.append(f"v{v.number} ← v{v.parent}{kind} {v.editor or ''}{aliases}: {v.n_requests} ticket(s) "
                   f"({', '.join(v.request_ids or [])})\n    {verdict}: {figs}{diff}")
    return out


@app.command()
def show(ref: str = typer.Argument(..., help="models:/<line>/<n>, <line>/<n> or <line>@<alias>"),
         tracking_uri: Optional[str] = _uri_opt, home: Optional[Path] = _home_opt, config: Optional[str] = _cfg_opt) -> None:
    """Show one version: lineage, editor, request ids, every gate per ticket, artifacts with sha256, alias moves."""
    from rich.table import Table

    reg = _registry(tracking_uri, home, config)
    v = reg.resolve(_ref(ref))
    chain = reg.chain(v)
    c = _console()
    c.print(f"[bold]{v.uri}[/]  kind={v.kind}  parent={v.parent}  aliases={', '.join(v.aliases) or '—'}")
    c.print(f"lineage: {' → '.join(str(x.number) for x in chain)}")
    c.print(f"base: {chain[0].base_source}  fingerprint {v.base_fingerprint[:16]}…")
    if not v.is_base:
        elided = (f" (left out of the tag, in the delta: {', '.join(v.hyperparameters_elided)})"
                  if v.hyperparameters_elided else "")
        c.print(f"editor: {v.editor}  hyperparameters: {json.dumps(v.hyperparameters, default=str)[:300]}{elided}")
        from registry.materialize import request_ids_of

        own = request_ids_of(reg, v)
        c.print(f"requests of this version ({len(own)}): {', '.join(own[:20]) or '—'}"
                f"{' …' if len(own) > 20 else ''}; applied up to it: {len(reg.applied_request_ids(v.line, v.number))}")
        if v.reverts:
            c.print(f"reverts request {v.reverts} (applied in version {v.tags.get('editops.revert_of')}) "
                    f"by {v.tags.get('editops.revert_mode')}")
        if v.state_file:
            c.print(f"editor state: {v.state_file} (stored with version {v.state_ref or v.number})")
    from registry.reports import gate_report

    report = gate_report(reg, v)
    if report and report.get("gates"):
        t = Table(title=f"gates ({'passed' if report.get('passed') else 'failed'})")
        for col in ("gate", "scope", "ticket", "metric", "threshold", "verdict"):
            t.add_column(col)
        for g in report["gates"]:
            m = "–" if g.get("metric") is None else f"{g['metric']:.4g}"
            colour = {"pass": "green", "fail": "red"}.get(g.get("verdict"), "white")
            t.add_row(g["gate"], g.get("scope", ""), g.get("request_id") or "", m, f"{g['op']} {g['threshold']:g}",
                      f"[{colour}]{g.get('verdict')}[/]")
        c.print(t)
    t = Table(title="artifacts")
    t.add_column("file")
    t.add_column("sha256")
    for name, sha in sorted(v.artifact_sha256.items()):
        t.add_row(name, sha)
    c.print(t)
    moves = [m for m in reg.alias_history(v.line) if m.to_version == v.number or m.from_version == v.number]
    if moves:
        t = Table(title="alias moves touching this version")
        for col in ("when (UTC)", "alias", "from", "to", "who", "why"):
            t.add_column(col)
        for m in moves:
            t.add_row(_when(m.at_ms), m.alias, str(m.from_version or ""), str(m.to_version), m.who, m.why)
        c.print(t)


@app.command()
def diff(line: str = typer.Argument(...), a: Optional[int] = typer.Argument(None, help="from version (default: b's parent)"),
         b: Optional[int] = typer.Argument(None, help="to version (default: head)"),
         behaviour: bool = typer.Option(True, "--behaviour/--no-behaviour", help="run the probe set on both versions"),
         probes: Optional[Path] = typer.Option(None, help="JSON/JSONL probes [{prompt, target}] (default: the line's)"),
         out: Optional[Path] = typer.Option(None, help="write diff.json/.md/.html/.png here"),
         log: bool = typer.Option(False, "--log", help="log the report to MLflow as a run of the line"),
         tracking_uri: Optional[str] = _uri_opt, home: Optional[Path] = _home_opt, config: Optional[str] = _cfg_opt) -> None:
    """Diff two versions: per-layer ‖ΔW‖ and rank, requests added/removed, probes whose answer changed."""
    from rich.table import Table

    reg = _registry(tracking_uri, home, config)
    if b is None:
        b = reg.latest(line).number
    probe_list = None
    if probes is not None:
        text = probes.read_text()
        probe_list = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    rep = reg.diff(line, a, b, probe_list, behaviour=behaviour, log=log)
    c = _console()
    c.print(f"[bold]{line}[/]: version {rep.a} → {rep.b}")
    c.print(f"requests added: {', '.join(rep.added_requests) or '—'}; removed: {', '.join(rep.removed_requests) or '—'}")
    t = Table(title="weights")
    for col in ("weight", "‖ΔW‖_F", "rank"):
        t.add_column(col)
    for x in rep.layers:
        t.add_row(x.weight, f"{x.norm:.4g}", str(x.rank))
    c.print(t)
    if rep.probes:
        t = Table(title=f"probes ({len(rep.changed_probes)} of {len(rep.probes)} changed top answer)")
        for col in ("prompt", f"top v{rep.a}", f"top v{rep.b}", "target", "p(target)"):
            t.add_column(col)
        for p in rep.probes:
            pt = "" if p.p_target_a is None else f"{p.p_target_a:.3f} → {p.p_target_b:.3f}"
            mark = "[red]" if p.changed else ""
            t.add_row(p.prompt, f"{p.top_a} ({p.p_top_a:.2f})", f"{mark}{p.top_b} ({p.p_top_b:.2f})", p.target or "", pt)
        c.print(t)
    if out is not None:
        files = rep.write(out)
        c.print(f"wrote {', '.join(str(f) for f in files)}")
    if log:
        c.print(f"logged to MLflow run {rep.meta.get('mlflow_run_id')}")


@app.command()
def promote(line: str = typer.Argument(...), version: Optional[int] = typer.Argument(None, help="default: the candidate"),
            why: str = typer.Option("", "--why", help="reason, recorded with the move"), who: Optional[str] = _who_opt,
            policy: str = typer.Option("manual", help="manual | gates (refuse a version whose gates did not pass)"),
            tracking_uri: Optional[str] = _uri_opt, home: Optional[Path] = _home_opt, config: Optional[str] = _cfg_opt) -> None:
    """Move the champion alias to a version (recorded with who/why)."""
    reg = _registry(tracking_uri, home, config)
    m = reg.promote(line, version, who=who, why=why, policy=policy)
    _console().print(f"champion of {line}: {m.from_version or '—'} → [bold]{m.to_version}[/] (by {m.who}: {m.why})")


@app.command()
def rollback(line: str = typer.Argument(...), to: Optional[int] = typer.Option(None, "--to", help="default: the previous champion"),
             why: str = typer.Option("", "--why"), who: Optional[str] = _who_opt,
             tracking_uri: Optional[str] = _uri_opt, home: Optional[Path] = _home_opt, config: Optional[str] = _cfg_opt) -> None:
    """Move the champion alias back to an earlier version (recorded with who/why)."""
    reg = _registry(tracking_uri, home, config)
    m = reg.rollback(line, to, who=who, why=why)
    _console().print(f"champion of {line}: {m.from_version} → [bold]{m.to_version}[/] (by {m.who}: {m.why})")


@app.command()
def revert(line: str = typer.Argument(...), request_id: str = typer.Argument(...),
           mode: str = typer.Option("replay", help="replay (re-solve the batch without it and replay later batches; "
                                                   "exact) | subtract (drop a one-request batch's delta; approximate)"),
           why: str = typer.Option("", "--why"), who: Optional[str] = _who_opt,
           tracking_uri: Optional[str] = _uri_opt, home: Optional[Path] = _home_opt, config: Optional[str] = _cfg_opt) -> None:
    """Register a new version without one request's change, keeping every later edit."""
    from registry.revert import revert as do_revert

    reg = _registry(tracking_uri, home, config)
    v = do_revert(reg, line, request_id, mode=mode, who=who, why=why)
    _console().print(f"registered {v.uri}: reverts {request_id} (applied in version {v.tags.get('editops.revert_of')}) "
                     f"by {mode}; replayed versions: {v.tags.get('editops.replayed') or '—'}")


@app.command()
def export(ref: str = typer.Argument(..., help="models:/<line>/<n>, <line>/<n> or <line>@<alias>"),
           out: Path = typer.Option(..., "--out", help="output directory"),
           fmt: str = typer.Option("merged", "--format", help="merged (plain HF dir) | peft (LoRA adapter for the base)"),
           rank: Optional[int] = typer.Option(None, help="peft: cap the LoRA rank (truncated SVD; default exact)"),
           tracking_uri: Optional[str] = _uri_opt, home: Optional[Path] = _home_opt, config: Optional[str] = _cfg_opt) -> None:
    """Export a version as a merged HF model directory or a PEFT LoRA adapter."""
    from editing.errors import ExportError
    from registry.export import export_merged, export_peft

    reg = _registry(tracking_uri, home, config)
    if fmt == "merged":
        path = export_merged(reg, _ref(ref), out)
        hint = f"AutoModelForCausalLM.from_pretrained({str(path)!r})"
    elif fmt == "peft":
        path = export_peft(reg, _ref(ref), out, rank=rank)
        hint = f"PeftModel.from_pretrained(<base model>, {str(path)!r})"
    else:
        raise ExportError(f"--format {fmt!r}: choose merged or peft")
    _console().print(f"exported {_ref(ref)} to {path}; load with {hint}")

"""The Prefect flow ``process_requests``: queued tickets in, gated versions out, exactly once.

One run::

    intake (inbox → ledger) ─► for each line with queued tickets (holding the line's lease):
        reconcile ledger ← registry (request ids on versions are the truth)
        materialise head ─► batches of ``batch_size`` ─► edit (task) ─► gates (task)
            pass → register (task; compare-and-set on the parent) → ledger: applied in N → outbox
            fail → bisect: tickets failing a per-ticket gate are rejected with their metrics,
                   the rest re-edited; a batch-level failure splits the batch in halves
        promote per the line's policy (auto: champion := newest version that passed)
    report → Prefect markdown artifact + MLflow run (experiment ``editops-pipeline``)

Exactly once: a ticket is ``applied`` only after the registry holds a version
carrying its request id; on every start each line is reconciled with the registry,
so a process killed anywhere (``EDITOPS_KILL_AT=<step>`` makes it ``os._exit`` at
``after_edit``, ``after_gates``, ``after_register``, ``before_ledger``,
``after_ledger``) leaves either no version (the ticket is edited again) or a version
the ledger catches up with (never edited twice). Two runs never fork a line: the
line lease in the ledger serialises them, and the registry's compare-and-set on the
parent refuses a stale parent (the run then rebases on the new head).

``run_once(cfg, engine="prefect"|"local")``: the same code with Prefect tasks, or
with the tasks' plain functions (no Prefect server; used by the kill tests).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from editing.atomic import write_text_atomic
from editing.errors import EditopsError, RegistryUnavailableError, StaleParentError
from editing.memory import trim_heap
from flows.config import ConfigError, LineConfig, ProjectConfig, load_config
from flows.intake import scan_inbox, write_outbox_ids
from flows.ledger import Ledger, holder_id

KILL_ENV = "EDITOPS_KILL_AT"
KILL_STEPS = ("after_intake", "after_edit", "after_gates", "after_register", "before_ledger", "after_ledger")
KILL_EXIT_CODE = 97


def checkpoint(step: str) -> None:
    """Die here (``os._exit``) when ``EDITOPS_KILL_AT`` names this step: a crash at that point."""
    if os.environ.get(KILL_ENV) == step:
        os._exit(KILL_EXIT_CODE)


def _transient(task_obj, task_run, state) -> bool:
    """Retry only failures that may go away: an unreachable registry or database."""
    try:
        state.result()
    except (RegistryUnavailableError, ConnectionError, TimeoutError):
        return True
    except Exception as exc:  # noqa: BLE001
        from sqlalchemy.exc import OperationalError

        return isinstance(exc, OperationalError)
    return False


# ---------------------------------------------------------------- run state
@dataclass
class Timings:
    """Seconds spent per step (summed over batches)."""

    intake: float = 0.0
    materialize: float = 0.0
    base_outputs: float = 0.0
    edit: float = 0.0
    gates: float = 0.0
    register: float = 0.0
    ledger: float = 0.0
    promote: float = 0.0
    total: float = 0.0

    def add(self, other: "Timings") -> None:
        for k in asdict(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class LineReport:
    line: str
    versions: list[dict[str, Any]] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    rejected: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    reconciled: list[str] = field(default_factory=list)
    promoted: int | None = None
    skipped: str | None = None
    errors: list[str] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)


@dataclass
class RunReport:
    intake: list[dict[str, Any]] = field(default_factory=list)
    lines: list[LineReport] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        out = ["# editops run", ""]
        if self.intake:
            out += ["## Intake", "", "| file | queued | invalid |", "|---|---|---|"]
            out += [f"| {r['file']} | {len(r['queued'])} | {len(r['invalid'])} |" for r in self.intake]
            out.append("")
        for lr in self.lines:
            out += [f"## Line `{lr.line}`", ""]
            if lr.skipped:
                out += [f"skipped: {lr.skipped}", ""]
                continue
            out.append(f"applied {len(lr.applied)}, rejected {len(lr.rejected)}, reconciled {len(lr.reconciled)}"
                       + (f", champion → v{lr.promoted}" if lr.promoted else ""))
            out.append("")
            if lr.versions:
                out += ["| version | parent | tickets | gates (measured) |", "|---|---|---|---|"]
                from registry.reports import gate_figures

                out += [f"| {v['number']} | {v['parent']} | {', '.join(v['request_ids'])} | "
                        f"{'pass' if v['passed'] else 'fail'}"
                        f"{': ' + ', '.join(f.short() for f in gate_figures(v.get('gates'))) if v.get('gates') else ''} |"
                        for v in lr.versions]
                out.append("")
            if lr.rejected:
                out += ["| rejected ticket | failed gates |", "|---|---|"]
                for rid, gates in lr.rejected.items():
                    failed = [f"{g['gate']}={g['metric']:.3f} (need {g['op']} {g['threshold']:g})"
                              for g in gates if g.get("verdict") == "fail" and g.get("metric") is not None]
                    out.append(f"| {rid} | {'; '.join(failed) or 'edit failed'} |")
                out.append("")
            for e in lr.errors:
                out.append(f"- error: {e}")
        t = self.timings
        out += ["## Time (s)", "", "| intake | materialise | base outputs | edit | gates | register | ledger | total |",
                "|---|---|---|---|---|---|---|---|",
                f"| {t.intake:.2f} | {t.materialize:.2f} | {t.base_outputs:.2f} | {t.edit:.2f} | {t.gates:.2f} | "
                f"{t.register:.2f} | {t.ledger:.2f} | {t.total:.2f} |"]
        return "\n".join(out)


@dataclass
class LineContext:
    """What one line's processing holds in memory."""

    cfg: ProjectConfig
    line: LineConfig
    ledger: Ledger
    registry: Any
    model: Any = None
    tokenizer: Any = None
    head: Any = None
    state: Any = None
    editor: Any = None
    base_cache: Any = None
    earlier: list = field(default_factory=list)
    heldout: list[str] | None = None
    report: LineReport | None = None
    say: Callable[[str], None] = print


# ------------------------------------------------------------------- tasks
@task(name="intake", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1, retry_condition_fn=_transient)
def intake_task(cfg: ProjectConfig, ledger: Ledger) -> list[dict[str, Any]]:
    return [asdict(r) for r in scan_inbox(cfg, ledger)]


@task(name="edit", cache_policy=NO_CACHE)
def edit_task(ctx: LineContext, requests: Sequence[Any]):
    """``editor.edit`` on the head model (left unchanged; the result's delta is the change)."""
    return ctx.editor.edit(ctx.model, ctx.tokenizer, list(requests), ctx.state)


@task(name="gates", cache_policy=NO_CACHE)
def gates_task(ctx: LineContext, requests: Sequence[Any]):
    """The line's gates on the model with the batch's delta applied (locality vs BASE)."""
    from editing.gates import deletion_gates, fact_gates

    if ctx.line.kind == "deletion":
        return deletion_gates(ctx.model, ctx.tokenizer, requests, ctx.base_cache, ctx.line.gates, earlier=ctx.earlier)
    return fact_gates(ctx.model, ctx.tokenizer, requests, ctx.base_cache, ctx.line.gates, earlier=ctx.earlier,
                      heldout_texts=ctx.heldout)


@task(name="register", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=2, retry_condition_fn=_transient)
def register_task(ctx: LineContext, result, report, requests: Sequence[Any], diff) -> Any:
    """Register head + delta (compare-and-set on the head as parent)."""
    from dataclasses import replace

    # the edit ran on a model materialised from this line: its delta is relative to the line's base
    # (an editor may have stamped the fingerprint of the already-edited head instead)
    delta = replace(result.delta, base_fingerprint=ctx.head.base_fingerprint)
    from registry.reports import gate_figures

    # each gate's figure also as a number (MLflow metric ``gate.figures.<gate>`` of the version's run)
    gates = report.to_dict()
    gates["figures"] = {f.gate: f.value for f in gate_figures(gates) if f.value is not None}
    return ctx.registry.register_version(
        ctx.line.name, parent=ctx.head.number, delta=delta, state=result.state, gate_report=gates,
        diff=diff, request_ids=[r.request_id for r in requests], requests=requests, gates_passed=report.passed,
        description=f"{len(requests)} ticket(s) by the editops pipeline",
    )


# --------------------------------------------------------------- helpers
def open_registry(cfg: ProjectConfig):
    from registry import Registry

    return Registry(cfg.tracking_uri, cfg.registry_uri, str(cfg.artifact_root) if cfg.artifact_root else None,
                    home=cfg.workdir)


def reconcile(ledger: Ledger, registry, line: str) -> dict[str, int]:
    """Mark applied every ticket whose request id is on a registered version of ``line``.

    Returns ``{request_id: version}`` of the tickets it moved. The registry is the
    truth: a process killed between registering and updating the ledger is caught up here.
    """
    if not registry.line_exists(line):
        return {}
    from registry.materialize import request_ids_of

    head = registry.latest(line)
    where: dict[str, int] = {}
    for v in registry.chain(head)[1:]:
        if v.kind == "revert":
            continue
        for rid in (v.request_ids if v.request_ids is not None else request_ids_of(registry, v)):
            where.setdefault(rid, v.number)
    moved: dict[str, int] = {}
    for row in ledger.rows(line=line, ids=list(where)):
        if row.state != "applied":
            ledger.set_state([row.id], "applied", version=where[row.id], reasons=[{"check": "reconciled",
                             "detail": f"found on registry version {where[row.id]}"}])
            moved[row.id] = where[row.id]
    return moved


def _base_cache_path(ctx: LineContext, fingerprint: str) -> Path:
    return ctx.cfg.workdir / "base-outputs" / f"{ctx.line.name}-{fingerprint[:16]}.json"


def ensure_base_outputs(ctx: LineContext, requests: Sequence[Any]) -> None:
    """BASE model outputs for ``requests`` (cached on disk per line and base fingerprint)."""
    base_fp = ctx.head.base_fingerprint
    path = _base_cache_path(ctx, base_fp)
    if ctx.line.kind == "fact":
        from editing.metrics.facts import BaseOutputs

        if ctx.base_cache is None and path.is_file():
            ctx.base_cache = BaseOutputs.load(path)
        # the base perplexity is of this line's held-out text (a line whose `heldout` changed measures it again)
        if (ctx.base_cache is not None and not ctx.base_cache.missing(requests)
                and ctx.base_cache.covers_heldout(ctx.heldout)):
            return
        base = _load_base(ctx)
        if ctx.base_cache is None:
            ctx.base_cache = BaseOutputs.compute(base.model, base.tokenizer, requests, heldout_texts=ctx.heldout,
                                                 model_fingerprint=base_fp)
        else:
            ctx.base_cache.extend(base.model, base.tokenizer, requests)
            ctx.base_cache.measure_heldout(base.model, base.tokenizer, ctx.heldout)
        ctx.base_cache.save(path)
        return
    from editing.metrics.deletion import cache_base_outputs, unrelated_probes

    if ctx.base_cache is None:
        ctx.base_cache = json.loads(path.read_text()) if path.is_file() else {}
    missing = [p for p in unrelated_probes(requests) if p.source not in ctx.base_cache]
    if not missing:
        return
    base = _load_base(ctx)
    from editing.metrics.deletion import generate_outputs

    outs = generate_outputs(base.model, base.tokenizer, [p.source for p in missing], ctx.line.max_new_tokens)
    ctx.base_cache.update(dict(zip([p.source for p in missing], outs)))
    write_text_atomic(path, json.dumps(ctx.base_cache, ensure_ascii=False))


_BASES: dict[str, Any] = {}


def _load_base(ctx: LineContext):
    from editing.models import load

    src = ctx.head.base_source if hasattr(ctx.head, "base_source") else ctx.line.base_model
    if src not in _BASES:
        _BASES.clear()
        _BASES[src] = load(src)
    return _BASES[src]


def _sampled_heldout(ctx: LineContext) -> None:
    """``ctx.heldout`` for a fact line whose ``heldout`` is ``samples:N``: the texts its base model samples itself,
    sampled once per (line, base fingerprint, spec) and kept in ``<workdir>/heldout/``, so every later run gates on
    the same texts and a run with nothing queued never loads the base to sample. An unreadable file is sampled
    again and rewritten."""
    spec = ctx.line.heldout
    if ctx.heldout is not None or ctx.line.kind != "fact" or not spec or not spec.startswith("samples"):
        return
    from editing.atomic import write_text_atomic
    from editing.metrics.text import heldout_texts

    fp = ctx.head.base_fingerprint
    path = ctx.cfg.workdir / "heldout" / f"{ctx.line.name}-{fp[:16]}-{spec.replace(':', '-')}.json"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["spec"] == spec and kept["base_fingerprint"] == fp and all(isinstance(t, str) for t in kept["texts"]):
            ctx.heldout = list(kept["texts"])
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    base = _load_base(ctx)
    ctx.heldout = heldout_texts(spec, model=base.model, tokenizer=base.tokenizer)
    write_text_atomic(path, json.dumps({"spec": spec, "base_fingerprint": fp, "texts": ctx.heldout}))


def _snapshot(model, delta) -> dict[str, Any]:
    """Copies of the weights a weight delta touches (restored exactly when its gates fail)."""
    if delta.kind != "weight":
        return {}
    from editing.arch import get_module

    return {n: get_module(model, n[: -len(".weight")] if n.endswith(".weight") else n).weight.detach().clone()
            for n in delta.factors}


def _restore(model, delta, snap: dict[str, Any]) -> None:
    import torch

    if delta.kind != "weight":
        delta.remove(model)
        return
    from editing.arch import get_module

    with torch.no_grad():
        for n, w in snap.items():
            get_module(model, n[: -len(".weight")] if n.endswith(".weight") else n).weight.copy_(w)


def _diff(ctx: LineContext, delta, requests, before) -> Any:
    """Weight diff + behaviour diff on the batch's own probes (causal models), without re-materialising."""
    from registry.diffs import DiffReport, behaviour_diff, read_probes, weight_diff

    rep = DiffReport(line=ctx.line.name, a=ctx.head.number, b=ctx.head.number + 1, layers=weight_diff(delta),
                     added_requests=[r.request_id for r in requests])
    if before is not None:
        probes, readings = before
        rep.probes = behaviour_diff(readings, read_probes(ctx.model, ctx.tokenizer, probes), probes)
    return rep


def _probes_for(ctx: LineContext, requests) -> Any:
    if ctx.line.kind != "fact" or getattr(ctx.model.config, "is_encoder_decoder", False):
        return None
    from registry.diffs import normalise_probes, read_probes

    probes = normalise_probes([*requests, *[n for r in requests for n in r.neighbours[:3]]])
    return probes, read_probes(ctx.model, ctx.tokenizer, probes)


def process_batch(ctx: LineContext, tickets: list, call: Callable) -> None:
    """Edit → gates → register → ledger for ``tickets``; on a gate failure, reject or bisect."""
    trim_heap()   # what earlier batches freed goes back to the system, as in editing.runner.run_sequential
    rep, t = ctx.report, ctx.report.timings
    requests = [tk.to_request() for tk in tickets]
    ids = [r.request_id for r in requests]
    ensure_t = time.perf_counter()
    ensure_base_outputs(ctx, requests)
    t.base_outputs += time.perf_counter() - ensure_t
    before = _probes_for(ctx, requests)
    t0 = time.perf_counter()
    try:
        result = call(edit_task, ctx, requests)
    except EditopsError as exc:
        if len(tickets) == 1:
            _reject(ctx, ids, {ids[0]: [{"gate": "edit", "verdict": "fail", "metric": None, "detail": str(exc)[:500]}]})
            return
        half = len(tickets) // 2
        process_batch(ctx, tickets[:half], call)
        process_batch(ctx, tickets[half:], call)
        return
    t.edit += time.perf_counter() - t0
    checkpoint("after_edit")
    snap = _snapshot(ctx.model, result.delta)
    result.delta.apply(ctx.model)
    t0 = time.perf_counter()
    report = call(gates_task, ctx, requests)
    t.gates += time.perf_counter() - t0
    checkpoint("after_gates")
    if report.passed:
        diff = _diff(ctx, result.delta, requests, before)
        t0 = time.perf_counter()
        try:
            version = call(register_task, ctx, result, report, requests, diff)
        except StaleParentError:
            _restore(ctx.model, result.delta, snap)
            raise
        t.register += time.perf_counter() - t0
        checkpoint("after_register")
        checkpoint("before_ledger")
        t0 = time.perf_counter()
        ctx.ledger.set_state(ids, "applied", version=version.number,
                             metrics={rid: report.for_ticket(rid) for rid in ids}, only_from=["queued"])
        write_outbox_ids(ctx.ledger, ids, ctx.cfg.outbox)
        t.ledger += time.perf_counter() - t0
        checkpoint("after_ledger")
        ctx.head, ctx.state = version, result.state
        ctx.earlier.extend(requests)
        rep.applied.extend(ids)
        rep.versions.append({"number": version.number, "parent": version.parent, "request_ids": ids,
                             "passed": True, "gates": report.to_dict()})
        ctx.say(f"  {ctx.line.name}: v{version.number} ← {len(ids)} ticket(s) (gates passed)")
        return
    _restore(ctx.model, result.delta, snap)
    failed = report.failed_tickets()
    if len(tickets) == 1:
        _reject(ctx, ids, {ids[0]: report.for_ticket(ids[0])})
        return
    if failed and len(failed) < len(tickets):
        _reject(ctx, list(failed), {rid: report.for_ticket(rid) for rid in failed})
        rest = [tk for tk in tickets if tk.request_id not in failed]
        ctx.say(f"  {ctx.line.name}: {len(failed)} ticket(s) failed their gates; re-editing the other {len(rest)}")
        process_batch(ctx, rest, call)
        return
    half = len(tickets) // 2
    ctx.say(f"  {ctx.line.name}: batch of {len(tickets)} failed "
            f"{', '.join(sorted({r.gate for r in report.failed()}))}; bisecting")
    process_batch(ctx, tickets[:half], call)
    process_batch(ctx, tickets[half:], call)


def _reject(ctx: LineContext, ids: list[str], metrics: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    reasons = {rid: [{"check": "gate_failed", "gates": [g["gate"] for g in m if g.get("verdict") == "fail"]}]
               for rid, m in metrics.items()}
    ctx.ledger.set_state(ids, "rejected", metrics=metrics, reasons=reasons, only_from=["queued"])
    write_outbox_ids(ctx.ledger, ids, ctx.cfg.outbox)
    ctx.report.timings.ledger += time.perf_counter() - t0
    ctx.report.rejected.update(metrics)
    for rid in ids:
        ctx.say(f"  {ctx.line.name}: rejected {rid} ({', '.join(reasons[rid][0]['gates']) or 'edit failed'})")


def _materialize(ctx: LineContext) -> None:
    t0 = time.perf_counter()
    ctx.head = ctx.registry.latest(ctx.line.name)
    m = ctx.registry.materialize(ctx.head)
    ctx.model, ctx.tokenizer = m.model, m.tokenizer
    ctx.state = ctx.registry.load_state(ctx.head, ctx.line.editor) if not ctx.head.is_base else None
    ctx.report.timings.materialize += time.perf_counter() - t0


def line_editor(line: LineConfig, model, known_requests: Sequence[Any]):
    """The line's editor for a run: its ``editor`` and ``hyperparameters``; a fact line whose editor holds a
    subject's other facts (``other_prompts``, given or from the model's preset) holds every prompt of
    ``known_requests`` (the line's applied and queued tickets) from the first batch on, unless the line sets
    ``hold_relations: false``. A line the editor refuses is a :class:`ConfigError` (its tickets stay queued)."""
    from editing.editors import get_editor
    from editing.editors.held_relations import with_relations_held

    try:
        editor = get_editor(line.editor, **line.hyperparameters)
        if line.kind == "fact":
            editor = with_relations_held(line.editor, editor, line.hyperparameters, known_requests, model,
                                         line.hold_relations)
        settings_for = getattr(editor, "settings_for", None)
        if settings_for is not None:
            settings_for(model)   # the model's preset joined with the line's settings: refused now, not per batch
    except EditopsError as exc:
        raise ConfigError(f"line {line.name!r}: {exc} (fix the line's editor settings in the config; its tickets "
                          "stay queued)") from exc
    return editor


def _earlier_requests(ctx: LineContext) -> list:
    return [row.ticket().to_request() for row in ctx.ledger.rows(line=ctx.line.name, state="applied")
            if row.payload and "kind" in row.payload]


def process_line(cfg: ProjectConfig, ledger: Ledger, registry, line: LineConfig, call: Callable, *,
                 max_tickets: int | None = None, lock_wait_s: float = 0.0, say: Callable = print,
                 use_lock: bool = True) -> LineReport:
    """All queued tickets of one line, holding the line's lease (see module docstring)."""
    report = LineReport(line=line.name)
    t_start = time.perf_counter()
    holder = holder_id()
    lock = f"line:{line.name}"
    deadline = time.monotonic() + lock_wait_s
    while use_lock and not ledger.acquire_lock(lock, holder):
        if time.monotonic() >= deadline:
            report.skipped = f"another run holds the line ({ledger.lock_holder(lock)})"
            say(f"  {line.name}: {report.skipped}; skipping")
            return report
        time.sleep(0.5)
    try:
        registry.ensure_line(line.name, line.base_model)
        ctx = LineContext(cfg=cfg, line=line, ledger=ledger, registry=registry, report=report, say=say)
        if line.heldout and line.kind == "fact" and not line.heldout.startswith("samples"):
            from editing.metrics.text import heldout_texts

            ctx.heldout = heldout_texts(line.heldout)   # a file or stdlib:N: read now, a bad path fails the run early
        for attempt in range(5):
            moved = list(reconcile(ledger, registry, line.name))
            if moved:
                write_outbox_ids(ledger, moved, cfg.outbox)
                say(f"  {line.name}: {len(moved)} ticket(s) found on registered versions; ledger caught up")
                report.reconciled += moved
            queued = ledger.rows(line=line.name, state="queued")[: max_tickets or None]
            if not queued:
                break
            say(f"{line.name}: {len(queued)} queued ticket(s), editor {line.editor}, batches of {line.batch_size}")
            _materialize(ctx)
            _sampled_heldout(ctx)
            ctx.earlier = _earlier_requests(ctx)
            tickets = [row.ticket() for row in queued]
            ctx.editor = line_editor(line, ctx.model, [*ctx.earlier, *(tk.to_request() for tk in tickets)])
            try:
                for i in range(0, len(tickets), line.batch_size):
                    if use_lock:
                        ledger.refresh_lock(lock, holder)
                    process_batch(ctx, tickets[i:i + line.batch_size], call)
                break
            except StaleParentError as exc:
                say(f"  {line.name}: the line moved on ({exc}); rebasing")
                continue
        if report.versions and line.promotion == "auto":
            t0 = time.perf_counter()
            last = report.versions[-1]["number"]
            registry.promote(line.name, last, policy="gates", why="auto-promotion: gates passed (editops pipeline)",
                             who="editops-pipeline")
            report.promoted = last
            report.timings.promote += time.perf_counter() - t0
            say(f"  {line.name}: champion → v{last}")
    finally:
        if use_lock:
            ledger.release_lock(lock, holder)
        report.timings.total = time.perf_counter() - t_start
    return report


def _log_report(registry, report: RunReport) -> str | None:
    """The run report as an MLflow run (markdown + JSON + timing metrics) in experiment ``editops-pipeline``."""
    try:
        exp = registry.experiment_id("editops-pipeline")
        run = registry.client.create_run(exp, run_name="process_requests")
        rid = run.info.run_id
        registry.client.log_text(rid, report.to_markdown(), "report.md")
        registry.client.log_text(rid, json.dumps(report.to_dict(), default=str, indent=1), "report.json")
        for k, v in asdict(report.timings).items():
            registry.client.log_metric(rid, f"seconds.{k}", float(v))
        registry.client.log_metric(rid, "applied", float(sum(len(l.applied) for l in report.lines)))
        registry.client.log_metric(rid, "rejected", float(sum(len(l.rejected) for l in report.lines)))
        registry.client.set_terminated(rid, "FINISHED")
        return rid
    except Exception:  # noqa: BLE001 - the report is a by-product; never fail a run for it
        return None


def _run(cfg: ProjectConfig, call: Callable, *, lines: Sequence[str] | None = None, max_tickets: int | None = None,
         lock_wait_s: float = 0.0, say: Callable = print, intake: bool = True) -> RunReport:
    t_start = time.perf_counter()
    cfg.ensure_dirs()
    ledger = Ledger(cfg.ledger_url)
    report = RunReport()
    if intake:
        t0 = time.perf_counter()
        report.intake = call(intake_task, cfg, ledger)
        report.timings.intake = time.perf_counter() - t0
        for r in report.intake:
            say(f"intake {r['file']}: {len(r['queued'])} queued, {len(r['invalid'])} invalid"
                + (f" (quarantine: {r['quarantine_file']})" if r.get("quarantine_file") else ""))
        checkpoint("after_intake")
    registry = open_registry(cfg)
    todo = [l for l in ledger.queued_lines() if (lines is None or l in lines)]
    for name in todo:
        if name not in cfg.lines:
            continue
        try:
            lr = process_line(cfg, ledger, registry, cfg.lines[name], call, max_tickets=max_tickets,
                              lock_wait_s=lock_wait_s, say=say,
                              use_lock=os.environ.get("EDITOPS_NO_LINE_LOCK") != "1")
        except EditopsError as exc:  # one line's failure does not stop the others; its tickets stay queued
            say(f"  {name}: [error] {exc}")
            lr = LineReport(line=name, errors=[str(exc)])
        report.lines.append(lr)
        report.timings.add(lr.timings)
    report.timings.total = time.perf_counter() - t_start
    _log_report(registry, report)
    return report


def _call_prefect(t, *args):
    return t(*args)


def _call_local(t, *args):
    return t.fn(*args)


@flow(name="process_requests", log_prints=True)
def process_requests(config: str | None = None, lines: list[str] | None = None, max_tickets: int | None = None,
                     lock_wait_s: float = 0.0) -> dict[str, Any]:
    """Prefect flow: intake → per line: edit → gates → register → ledger → promote (module docstring)."""
    from prefect.artifacts import create_markdown_artifact

    cfg = load_config(config)
    report = _run(cfg, _call_prefect, lines=lines, max_tickets=max_tickets, lock_wait_s=lock_wait_s)
    create_markdown_artifact(key="editops-run-report", markdown=report.to_markdown(),
                             description="editops: tickets applied/rejected, versions, gate results")
    return report.to_dict()


def run_once(cfg: ProjectConfig | str | None = None, *, engine: str = "prefect", lines: Sequence[str] | None = None,
             max_tickets: int | None = None, lock_wait_s: float = 0.0, say: Callable = print) -> RunReport | dict:
    """Process the inbox and every queued ticket once. ``engine="local"`` runs without Prefect."""
    if engine == "prefect":
        path = cfg if isinstance(cfg, (str, type(None))) else _config_path(cfg)
        return process_requests(config=path, lines=list(lines) if lines else None, max_tickets=max_tickets,
                                lock_wait_s=lock_wait_s)
    if not isinstance(cfg, ProjectConfig):
        cfg = load_config(cfg)
    return _run(cfg, _call_local, lines=lines, max_tickets=max_tickets, lock_wait_s=lock_wait_s, say=say)


def _config_path(cfg: ProjectConfig) -> str:
    p = cfg.root / "editops.yaml"
    if not p.is_file():
        from flows.config import write_config

        write_config(cfg, p)
    return str(p)

"""Inbox intake: ticket files in, queued tickets and quarantined rows out.

``scan_inbox(cfg, ledger)`` takes every ``*.json``, ``*.jsonl``, ``*.csv``,
``*.yaml``/``*.yml`` file in ``<workdir>/inbox``, and for each file:

1. claims it by an atomic rename into ``inbox/.processing/`` (two workers never
   read the same file; a file left there by a dead process is taken up again);
2. reads its records (bad bytes become lone surrogates, so a row with odd
   encoding fails alone; a line of JSONL that does not parse fails alone);
3. validates them with the pandera schemas (:mod:`flows.schemas`);
4. checks the line exists, its kind matches, and the requester is allowed;
5. flags duplicates (same request_id, other content) and contradictions (same
   subject+relation or same prompt, other target, against queued tickets and
   earlier rows of the file): the later ticket is not queued;
6. queues the valid tickets in the ledger, records every other row as
   ``invalid`` with machine-readable reasons, writes those rows to
   ``quarantine/<file>.<sha>.invalid.jsonl`` and an outcome file per ticket to
   ``outbox/``; then moves the file to ``inbox/processed/``.

Re-ingesting the same file is harmless (identical tickets are recognised).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from editing.atomic import write_text_atomic
from flows.config import ProjectConfig
from flows.ledger import Ledger, TicketRow, _holder_dead, holder_id
from flows.schemas import InvalidRow, validate_records
from flows.tickets import Ticket

SUFFIXES = (".json", ".jsonl", ".csv", ".yaml", ".yml")
MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass
class IntakeReport:
    """What happened to one file."""

    file: str
    queued: list[str] = field(default_factory=list)
    same: list[str] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    quarantine_file: str | None = None

    @property
    def n_rows(self) -> int:
        return len(self.queued) + len(self.same) + len(self.invalid)


class _ParseFailure:
    """A record that could not be parsed (e.g. one bad JSONL line)."""

    def __init__(self, where: str, message: str, text: str = ""):
        self.where, self.message, self.text = where, message, text


def decode(data: bytes) -> str:
    """Bytes → text: UTF-8 (BOM stripped) or UTF-16 with BOM; undecodable bytes become lone surrogates."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def read_records(path: Path, suffix: str | None = None) -> list[Any]:
    """The raw records of a ticket file (format by ``suffix``, default the file's); parse failures are records."""
    import yaml

    data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES:
        return [_ParseFailure("file", f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")]
    text = decode(data)
    suffix = (suffix or path.suffix).lower()
    if suffix == ".jsonl":
        return _jsonl_text(text)
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            if "\n{" in text.strip():  # JSON lines in a .json file
                return _jsonl_text(text)
            return [_ParseFailure("file", f"not valid JSON: {exc}", text[:200])]
        return _unwrap(obj)
    if suffix in (".yaml", ".yml"):
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            return [_ParseFailure("file", f"not valid YAML: {exc}", text[:200])]
        except RecursionError as exc:
            return [_ParseFailure("file", f"YAML nested too deeply: {exc}")]
        return _unwrap(obj)
    if suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            rows = []
            for r in reader:
                extra = r.pop(None, None)
                rec = {k: v for k, v in r.items() if k is not None}
                if extra:
                    rec["_extra_cells"] = extra
                rows.append(rec)
            return rows
        except csv.Error as exc:
            return [_ParseFailure("file", f"not valid CSV: {exc}")]
    return [_ParseFailure("file", f"unknown file type {suffix!r}; use one of {SUFFIXES}")]


def _jsonl_text(text: str) -> list[Any]:
    out: list[Any] = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as exc:
                out.append(_ParseFailure(f"line {n}", str(exc), line[:200]))
    return out


def _unwrap(obj: Any) -> list[Any]:
    if isinstance(obj, dict) and isinstance(obj.get("tickets"), list):
        return obj["tickets"]
    if isinstance(obj, list):
        return obj
    if obj is None:
        return []
    return [obj]


# ------------------------------------------------------------------ outbox
def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s)[:150]


def write_outbox(row: TicketRow, outbox: Path) -> Path:
    """``outbox/<id>.json``: the ticket's state, version, reasons and metrics (atomic write)."""
    return write_text_atomic(outbox / f"{_safe_name(row.id)}.json",
                             json.dumps(row.outcome(), indent=2, sort_keys=True, default=str, ensure_ascii=False))


def write_outbox_ids(ledger: Ledger, ids: Iterable[str], outbox: Path) -> None:
    for row in ledger.rows(ids=list(ids)):
        write_outbox(row, outbox)


# ------------------------------------------------------------------ intake
def _claim(path: Path, processing: Path, holder: str) -> Path | None:
    processing.mkdir(parents=True, exist_ok=True)
    target = processing / f"{path.name}@{holder}"
    try:
        os.rename(path, target)
    except (FileNotFoundError, OSError):
        return None
    return target


def _original_name(claimed: Path) -> str:
    return claimed.name.rsplit("@", 1)[0]


def ingest_file(path: Path, cfg: ProjectConfig, ledger: Ledger, *, source_name: str | None = None) -> IntakeReport:
    """Validate one (already claimed) file and record every row's outcome (see module docstring)."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()[:12]
    name = source_name or path.name
    source = f"{name}#{sha}"
    report = IntakeReport(file=name)
    records = read_records(path, Path(name).suffix)
    parse_failures = [(i, r) for i, r in enumerate(records) if isinstance(r, _ParseFailure)]
    result = validate_records([r if not isinstance(r, _ParseFailure) else {} for r in records])
    pf_rows = {i for i, _ in parse_failures}
    invalid: list[InvalidRow] = [r for r in result.invalid if r.row not in pf_rows]
    for i, pf in parse_failures:
        invalid.append(InvalidRow(i, pf.text, [{"field": None, "check": "parse_error", "detail": f"{pf.where}: {pf.message}"[:300],
                                                "value": None}]))

    # line, kind and requester rules, contradictions
    accepted: list[Ticket] = []
    seen_keys: dict[tuple, tuple[str, str]] = {}
    for line in {t.line for _, t in result.valid}:
        if line in cfg.lines:
            for row in ledger.rows(line=line, state="queued"):
                try:
                    t = row.ticket()
                except Exception:  # noqa: BLE001
                    continue
                for k in t.contradiction_keys:
                    seen_keys.setdefault(k, (t.request_id, t.target_key))
    for i, t in result.valid:
        reasons = []
        line_cfg = cfg.lines.get(t.line)
        if line_cfg is None:
            reasons.append({"field": "line", "check": "unknown_line", "detail": f"configured lines: {sorted(cfg.lines)}",
                            "value": t.line})
        else:
            if line_cfg.kind != t.kind:
                reasons.append({"field": "kind", "check": "kind_mismatch",
                                "detail": f"line {t.line} takes {line_cfg.kind} tickets", "value": t.kind})
            if not line_cfg.allows(t.requester):
                reasons.append({"field": "requester", "check": "requester_not_allowed",
                                "detail": f"line {t.line} accepts tickets from {line_cfg.allowed_requesters}",
                                "value": t.requester})
        if not reasons:
            for k in t.contradiction_keys:
                other = seen_keys.get(k)
                if other and other[0] != t.request_id and other[1] != t.target_key:
                    reasons.append({"field": None, "check": "contradicts", "detail": f"same {k[0]} as {other[0]} "
                                    "with a different target; resolve and resubmit one", "value": other[0]})
                    break
        if reasons:
            invalid.append(InvalidRow(i, t.payload, reasons, request_id=t.request_id, line=t.line, requester=t.requester))
            continue
        for k in t.contradiction_keys:
            seen_keys.setdefault(k, (t.request_id, t.target_key))
        accepted.append(t)

    outcomes: list[str] = []
    for t in accepted:
        status = ledger.add_ticket(t, source=source)
        if status == "queued":
            report.queued.append(t.request_id)
            outcomes.append(t.request_id)
        elif status == "same":
            report.same.append(t.request_id)
        else:
            invalid.append(InvalidRow(-1, t.payload, [{"field": "request_id", "check": "duplicate_request_id",
                                                       "detail": "a different ticket with this id exists",
                                                       "value": t.request_id}],
                                      request_id=t.request_id, line=t.line, requester=t.requester))
    invalid.sort(key=lambda r: r.row)
    quarantine_lines = []
    for n, inv in enumerate(invalid):
        row_no = inv.row if inv.row >= 0 else f"dup{n}"
        key = f"invalid:{sha}:{row_no}" if inv.reasons[0]["check"] != "duplicate_request_id" else \
            f"duplicate:{inv.request_id}:{sha}"
        kind = inv.record.get("kind") if isinstance(inv.record, dict) and isinstance(inv.record.get("kind"), str) else None
        ledger.add_invalid(key, reasons=inv.reasons, record=inv.record, request_id=inv.request_id, line=inv.line,
                           requester=inv.requester, kind=kind, source=source)
        outcomes.append(key[:200])
        entry = {"ledger_id": key[:200], "row": inv.row, "request_id": inv.request_id, "reasons": inv.reasons,
                 "record": inv.record}
        report.invalid.append(entry)
        quarantine_lines.append(json.dumps(entry, default=str, ensure_ascii=True))
    if quarantine_lines:
        qf = write_text_atomic(cfg.quarantine / f"{_safe_name(Path(name).stem)}.{sha}.invalid.jsonl",
                               "\n".join(quarantine_lines) + "\n")
        report.quarantine_file = str(qf)
    write_outbox_ids(ledger, outcomes, cfg.outbox)
    return report


def scan_inbox(cfg: ProjectConfig, ledger: Ledger, *, holder: str | None = None) -> list[IntakeReport]:
    """Ingest every ticket file in the inbox (and any left half-done by a dead process)."""
    cfg.ensure_dirs()
    holder = holder or holder_id()
    processing = cfg.inbox / ".processing"
    processed = cfg.inbox / "processed"
    claimed: list[Path] = []
    if processing.is_dir():  # files a killed process had claimed
        for p in sorted(processing.iterdir()):
            if "@" in p.name and _holder_dead(p.name.rsplit("@", 1)[1]):
                c = _claim(p, processing, holder)
                if c is not None:
                    os.rename(c, processing / f"{_original_name(p)}@{holder}")
                    claimed.append(processing / f"{_original_name(p)}@{holder}")
    for p in sorted(cfg.inbox.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            c = _claim(p, processing, holder)
            if c is not None:
                claimed.append(c)
    reports = []
    for c in claimed:
        name = _original_name(c)
        if Path(name).suffix.lower() not in SUFFIXES:
            cfg.quarantine.mkdir(parents=True, exist_ok=True)
            shutil.move(str(c), cfg.quarantine / f"{name}.unknown-format")
            reports.append(IntakeReport(file=name, invalid=[{"reasons": [{"check": "unknown_format", "field": None,
                                                                          "detail": f"use one of {SUFFIXES}"}]}]))
            continue
        reports.append(ingest_file(c, cfg, ledger, source_name=name))
        processed.mkdir(parents=True, exist_ok=True)
        dest = processed / name
        if dest.exists():
            dest = processed / f"{Path(name).stem}.{hashlib.sha256(c.read_bytes()).hexdigest()[:8]}{Path(name).suffix}"
        os.replace(c, dest)
    return reports


def submit_file(path: str | os.PathLike, cfg: ProjectConfig, ledger: Ledger) -> IntakeReport:
    """``editops submit``: copy a ticket file into the inbox and ingest it now."""
    src = Path(path)
    if not src.is_file():
        from editing.errors import FormatError

        raise FormatError(f"ticket file {src} does not exist")
    cfg.ensure_dirs()
    holder = holder_id()
    processing = cfg.inbox / ".processing"
    processing.mkdir(parents=True, exist_ok=True)
    tmp = processing / f"{src.name}@{holder}"
    shutil.copyfile(src, tmp)
    report = ingest_file(tmp, cfg, ledger, source_name=src.name)
    processed = cfg.inbox / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, processed / f"{src.stem}.{hashlib.sha256(src.read_bytes()).hexdigest()[:8]}{src.suffix}")
    return report

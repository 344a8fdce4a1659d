"""pandera schemas for tickets, with every failure collected per row.

``validate_records(records)`` takes the raw records of one file (whatever they
are: dicts, lists, numbers, strings with odd bytes), lays them out in one
DataFrame of ``object`` columns, validates the fact rows against
:class:`FactTicketSchema` and the deletion rows against
:class:`DeletionTicketSchema` with ``lazy=True`` (pandera collects every failing
check), and returns the valid rows as :class:`~flows.tickets.Ticket` objects and
the invalid ones with machine-readable reasons::

    {"field": "subject", "check": "missing", "detail": "...", "value": null}

Reason codes: ``not_an_object``, ``unknown_kind``, ``missing``, ``wrong_type``,
``too_short``, ``too_long``, ``bad_chars`` (NUL / undecodable bytes), ``pattern``,
``out_of_range``, ``bad_datetime``, ``subject_not_in_prompt``, ``target_unchanged``,
``positive_equals_unwanted``, ``too_many``, ``request_error``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from flows.tickets import ALL_FIELDS, DELETION_FIELDS, FACT_FIELDS, DeletionTicket, FactTicket, Ticket, utcnow

MAX_ID = 128
MAX_TEXT = 1000
MAX_SHORT = 300
MAX_ITEMS = 50
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$")
_BAD_CHARS = re.compile(r"[\x00\ud800-\udfff]")


class BadText(str):
    """A string holding NUL or undecodable bytes (lone surrogates); it fails every text check."""


def _clean(x: Any, depth: int = 0) -> Any:
    """Wrap strings with bad characters in :class:`BadText` (pandera itself cannot encode them)."""
    if isinstance(x, str):
        return BadText(x.encode("utf-8", "backslashreplace").decode("utf-8")) if _BAD_CHARS.search(x) else x
    if isinstance(x, list) and depth < 3:
        return [_clean(v, depth + 1) for v in x]
    if isinstance(x, dict) and depth < 3:
        return {k: _clean(v, depth + 1) for k, v in x.items()}
    return x


def _str_ok(x: Any, lo: int, hi: int) -> bool:
    if isinstance(x, BadText):
        return False
    return isinstance(x, str) and lo <= len(x.strip()) and len(x) <= hi and not _BAD_CHARS.search(x)


def _pair_list_ok(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) <= MAX_ITEMS and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(_str_ok(s, 1, MAX_TEXT) for s in p) for p in x)


def _str_list_ok(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) <= MAX_ITEMS and all(_str_ok(s, 1, MAX_TEXT) for s in x)


class TicketSchema(pa.DataFrameModel):
    """Fields of every ticket (``object`` columns; element checks say what is wrong)."""

    request_id: Series[object] = pa.Field(nullable=False)
    line: Series[object] = pa.Field(nullable=False)
    requester: Series[object] = pa.Field(nullable=False)
    priority: Series[object] = pa.Field(nullable=True)
    created_at: Series[object] = pa.Field(nullable=True)

    @pa.check("request_id", element_wise=True)
    def request_id_format(cls, x) -> bool:
        return isinstance(x, str) and 0 < len(x) <= MAX_ID and bool(_ID_RE.match(x))

    @pa.check("line", "requester", element_wise=True)
    def short_text(cls, x) -> bool:
        return _str_ok(x, 1, MAX_ID)

    @pa.check("priority", element_wise=True)
    def priority_range(cls, x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 9

    @pa.check("created_at", element_wise=True)
    def datetime_value(cls, x) -> bool:
        return isinstance(x, datetime)

    class Config:
        strict = False
        coerce = False


class FactTicketSchema(TicketSchema):
    """A fact update: subject in the prompt, a new target different from the true one."""

    subject: Series[object] = pa.Field(nullable=False)
    prompt: Series[object] = pa.Field(nullable=False)
    target_new: Series[object] = pa.Field(nullable=False)
    target_true: Series[object] = pa.Field(nullable=True)
    relation: Series[object] = pa.Field(nullable=True)
    paraphrases: Series[object] = pa.Field(nullable=True)
    neighbours: Series[object] = pa.Field(nullable=True)

    @pa.check("subject", "target_new", "target_true", "relation", element_wise=True)
    def fact_short_text(cls, x) -> bool:
        return _str_ok(x, 1, MAX_SHORT)

    @pa.check("prompt", element_wise=True)
    def prompt_text(cls, x) -> bool:
        return _str_ok(x, 1, MAX_TEXT)

    @pa.check("paraphrases", element_wise=True)
    def string_list(cls, x) -> bool:
        return _str_list_ok(x)

    @pa.check("neighbours", element_wise=True)
    def neighbour_pairs(cls, x) -> bool:
        return _pair_list_ok(x)

    @pa.dataframe_check
    def subject_not_in_prompt(cls, df: pd.DataFrame) -> pd.Series:
        def ok(row) -> bool:
            p, s = row["prompt"], row["subject"]
            if not (isinstance(p, str) and isinstance(s, str) and s.strip()):
                return True  # reported by the field checks
            return p.count("{}") == 1 or (p.count("{}") == 0 and s in p)
        return df.apply(ok, axis=1).astype(bool)

    @pa.dataframe_check
    def target_unchanged(cls, df: pd.DataFrame) -> pd.Series:
        def ok(row) -> bool:
            n, t = row["target_new"], row["target_true"]
            return not (isinstance(n, str) and isinstance(t, str) and n.strip().lower() == t.strip().lower())
        return df.apply(ok, axis=1).astype(bool)


class DeletionTicketSchema(TicketSchema):
    """A behaviour deletion: source, unwanted output, a different correct output."""

    source: Series[object] = pa.Field(nullable=False)
    unwanted: Series[object] = pa.Field(nullable=False)
    positive: Series[object] = pa.Field(nullable=False)
    behaviour: Series[object] = pa.Field(nullable=True)
    generalization: Series[object] = pa.Field(nullable=True)
    locality: Series[object] = pa.Field(nullable=True)

    @pa.check("source", "unwanted", "positive", element_wise=True)
    def deletion_text(cls, x) -> bool:
        return _str_ok(x, 1, MAX_TEXT)

    @pa.check("behaviour", element_wise=True)
    def behaviour_text(cls, x) -> bool:
        return _str_ok(x, 1, MAX_SHORT)

    @pa.check("generalization", "locality", element_wise=True)
    def probe_pairs(cls, x) -> bool:
        return _pair_list_ok(x)

    @pa.dataframe_check
    def positive_equals_unwanted(cls, df: pd.DataFrame) -> pd.Series:
        def ok(row) -> bool:
            u, p = row["unwanted"], row["positive"]
            return not (isinstance(u, str) and isinstance(p, str) and u.strip() == p.strip())
        return df.apply(ok, axis=1).astype(bool)


# ----------------------------------------------------------------- normalisation
def _maybe_json(x: Any) -> Any:
    """CSV cells hold lists as JSON (``["a","b"]``) or ``|``-separated text."""
    if isinstance(x, str):
        s = x.strip()
        if s.startswith("["):
            try:
                return json.loads(s)
            except (json.JSONDecodeError, RecursionError):
                return x
        return [p.strip() for p in s.split("|") if p.strip()]
    return x


def _pairs(x: Any, a: str, b: str) -> Any:
    """``[{"prompt":..,"target":..}]`` or ``[[p, t]]`` → ``[[p, t]]`` (anything else is left to fail)."""
    x = _maybe_json(x)
    if not isinstance(x, list):
        return x
    out = []
    for item in x:
        if isinstance(item, dict) and set(item) >= {a, b}:
            out.append([item[a], item[b]])
        elif isinstance(item, str) and "=>" in item:
            out.append([s.strip() for s in item.split("=>", 1)])
        else:
            out.append(item)
    return out


def _priority(x: Any) -> Any:
    if x is None:
        return 0
    if isinstance(x, str) and x.strip().lstrip("-").isdigit() and len(x.strip()) < 4:
        return int(x.strip())
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _created(x: Any) -> Any:
    if x is None:
        return utcnow()
    if isinstance(x, datetime):
        return x if x.tzinfo else x.replace(tzinfo=timezone.utc)
    if isinstance(x, str) and len(x) <= 64:
        try:
            d = datetime.fromisoformat(x.strip().replace("Z", "+00:00"))
            return d if d.tzinfo else d.replace(tzinfo=timezone.utc)
        except ValueError:
            return x
    return x


def _infer_kind(rec: dict[str, Any]) -> Any:
    kind = rec.get("kind")
    if kind is not None:
        return kind.strip().lower() if isinstance(kind, str) else kind
    if any(rec.get(k) is not None for k in ("source", "unwanted", "positive")):
        return "deletion"
    return "fact"


def _is_null(x: Any) -> bool:
    return x is None or (isinstance(x, float) and x != x)


def normalise(rec: dict[str, Any]) -> dict[str, Any]:
    """One raw record → a row with every ticket field (``None`` where absent)."""
    row = {k: (None if _is_null(rec.get(k)) else _clean(rec.get(k))) for k in ALL_FIELDS}
    for k, v in list(row.items()):
        if isinstance(v, str) and v == "" and k not in ("request_id",):
            row[k] = None  # an empty CSV cell is an absent field
    row["kind"] = _infer_kind(rec)
    row["priority"] = _priority(row["priority"])
    row["created_at"] = _created(row["created_at"])
    if row["paraphrases"] is not None:
        row["paraphrases"] = _maybe_json(row["paraphrases"])
    if row["neighbours"] is not None:
        row["neighbours"] = _pairs(row["neighbours"], "prompt", "target")
    if row["generalization"] is not None:
        row["generalization"] = _pairs(row["generalization"], "source", "unwanted")
    if row["locality"] is not None:
        row["locality"] = _pairs(row["locality"], "source", "reference")
    return row


# ------------------------------------------------------------------- results
@dataclass
class InvalidRow:
    """One record that failed, with its position in the file, what it held and why."""

    row: int
    record: Any
    reasons: list[dict[str, Any]]
    request_id: str | None = None
    line: str | None = None
    requester: str | None = None


@dataclass
class ValidationResult:
    valid: list[tuple[int, Ticket]] = field(default_factory=list)
    invalid: list[InvalidRow] = field(default_factory=list)


def _short_repr(x: Any, n: int = 80) -> Any:
    if x is None or isinstance(x, (bool, int, float)):
        return x
    s = x if isinstance(x, str) else repr(x)
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= n else s[:n] + f"…(+{len(s) - n} chars)"


_CHECK_CODES = {
    "not_nullable": "missing",
    "request_id_format": "pattern",
    "priority_range": "out_of_range",
    "datetime_value": "bad_datetime",
}
_TEXT_CHECKS = {"short_text", "fact_short_text", "prompt_text", "deletion_text", "behaviour_text"}
_LIST_CHECKS = {"string_list", "neighbour_pairs", "probe_pairs"}
_FRAME_CHECKS = {"subject_not_in_prompt", "target_unchanged", "positive_equals_unwanted"}


def _reason_code(check: str, value: Any) -> str:
    if check in _CHECK_CODES:
        if check == "request_id_format" and not isinstance(value, str):
            return "wrong_type"
        if check in ("priority_range", "datetime_value") and not isinstance(value, (int, datetime)):
            return "wrong_type" if check == "priority_range" else "bad_datetime"
        if check == "request_id_format" and isinstance(value, str) and len(value) > MAX_ID:
            return "too_long"
        return _CHECK_CODES[check]
    if check in _TEXT_CHECKS:
        if isinstance(value, BadText):
            return "bad_chars"
        if not isinstance(value, str):
            return "wrong_type"
        if _BAD_CHARS.search(value):
            return "bad_chars"
        return "too_short" if not value.strip() else "too_long"
    if check in _LIST_CHECKS:
        if isinstance(value, (list, tuple)) and len(value) > MAX_ITEMS:
            return "too_many"
        return "wrong_type"
    return check


def _validate_kind(df: pd.DataFrame, schema: type[TicketSchema]) -> dict[int, list[dict[str, Any]]]:
    """Row index → reasons, for every failing check (pandera lazy mode).

    A failure pandera cannot attribute to a row (index ``None``) would sink the
    whole file; then the rows are validated one by one so valid rows still pass.
    """
    reasons: dict[int, list[dict[str, Any]]] = {}
    cols = list(schema.to_schema().columns)
    try:
        schema.validate(df[cols], lazy=True)
    except pa.errors.SchemaErrors as exc:
        fc = exc.failure_cases
        unattributed = fc["index"].isna().any()
        if unattributed and len(df) > 1:
            for i in df.index:
                for k, rs in _validate_kind(df.loc[[i]], schema).items():
                    reasons.setdefault(k, []).extend(rs)
            return reasons
        for _, f in fc.iterrows():
            idx = f["index"]
            col = f["column"] if isinstance(f["column"], str) and f["column"] in cols else None
            check = str(f["check"])
            if idx is None or (isinstance(idx, float) and idx != idx):
                targets = list(df.index)  # a one-row frame: the failure is that row's
            else:
                targets = [int(idx)]
            if check in _FRAME_CHECKS:
                col = None
            for i in targets:
                if col is None and any(r["detail"] == check for r in reasons.get(i, [])):
                    continue
                value = df.at[i, col] if col else None
                reasons.setdefault(i, []).append({
                    "field": col, "check": _reason_code(check, value), "detail": check,
                    "value": _short_repr(value),
                })
    return reasons


def _to_ticket(row: dict[str, Any]) -> Ticket:
    common = {k: row[k] for k in ("request_id", "line", "requester", "priority", "created_at")}
    if row["kind"] == "fact":
        return FactTicket(
            **common, subject=row["subject"], prompt=row["prompt"], target_new=row["target_new"],
            target_true=row["target_true"], relation=row["relation"],
            paraphrases=tuple(row["paraphrases"] or ()), neighbours=tuple(tuple(p) for p in row["neighbours"] or ()),
        )
    return DeletionTicket(
        **common, source=row["source"], unwanted=row["unwanted"], positive=row["positive"],
        behaviour=row["behaviour"], generalization=tuple(tuple(p) for p in row["generalization"] or ()),
        locality=tuple(tuple(p) for p in row["locality"] or ()),
    )


def validate_records(records: Iterable[Any]) -> ValidationResult:
    """Validate raw records; never raises for bad data (every bad row becomes an :class:`InvalidRow`)."""
    from editing.errors import EditopsError

    result = ValidationResult()
    rows: dict[int, dict[str, Any]] = {}
    raw: dict[int, Any] = {}
    for i, rec in enumerate(records):
        raw[i] = rec
        if not isinstance(rec, dict):
            result.invalid.append(InvalidRow(i, _short_repr(rec, 200), [
                {"field": None, "check": "not_an_object", "detail": type(rec).__name__, "value": _short_repr(rec)}]))
            continue
        rows[i] = normalise({str(k): v for k, v in rec.items()})
    reasons: dict[int, list[dict[str, Any]]] = {}
    by_kind: dict[str, list[int]] = {"fact": [], "deletion": []}
    for i, row in rows.items():
        if isinstance(row["kind"], str) and row["kind"] in by_kind:
            by_kind[row["kind"]].append(i)
        else:
            reasons[i] = [{"field": "kind", "check": "unknown_kind", "detail": "kind must be fact or deletion",
                           "value": _short_repr(row["kind"])}]
    for kind, schema in (("fact", FactTicketSchema), ("deletion", DeletionTicketSchema)):
        idx = by_kind[kind]
        if not idx:
            continue
        df = pd.DataFrame([rows[i] for i in idx], index=idx, dtype=object)
        for i, rs in _validate_kind(df, schema).items():
            reasons.setdefault(i, []).extend(rs)
    for i, row in rows.items():
        if i not in reasons:
            try:
                ticket = _to_ticket(row)
                ticket.to_request()
            except (EditopsError, TypeError, ValueError) as exc:
                reasons[i] = [{"field": None, "check": "request_error", "detail": _short_repr(str(exc), 300),
                               "value": None}]
            else:
                result.valid.append((i, ticket))
                continue
        rid = row.get("request_id")
        result.invalid.append(InvalidRow(
            i, {str(k)[:100]: _short_repr(v, 200) for k, v in raw[i].items()} if isinstance(raw[i], dict) else raw[i],
            reasons[i],
            request_id=rid if isinstance(rid, str) and _ID_RE.match(rid) and len(rid) <= MAX_ID else None,
            line=row.get("line") if _str_ok(row.get("line"), 1, MAX_ID) else None,
            requester=row.get("requester") if _str_ok(row.get("requester"), 1, MAX_ID) else None,
        ))
    result.invalid.sort(key=lambda r: r.row)
    return result

"""The durable ledger: every ticket's state, with timestamps and history (SQLAlchemy).

States::

    received → validated → queued → applied (version N)
                                  → rejected (gate metrics that failed)
             → invalid (machine-readable reasons)

A row's key ``id`` is the ticket's ``request_id`` for valid tickets; rows that
cannot be tickets (no usable id, duplicate id, contradiction) get a synthetic
``invalid:…`` key, so nothing submitted is ever dropped. ``events`` keeps every
transition. ``locks`` holds per-line leases (the pipeline holds one while it edits
a line, so two runs never edit a line at once; the registry's compare-and-set on
the parent version is the second guard).

SQLite by default (``sqlite:///.editops/ledger.db``); any SQLAlchemy URL works
(``postgresql+psycopg2://…`` for teams).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from editing.errors import EditopsError

STATES = ("received", "validated", "queued", "applied", "rejected", "invalid")
TERMINAL = ("applied", "rejected", "invalid")

metadata = sa.MetaData()

tickets = sa.Table(
    "editops_tickets", metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("request_id", sa.String(200), index=True),
    sa.Column("line", sa.String(200), index=True),
    sa.Column("kind", sa.String(20)),
    sa.Column("requester", sa.String(200)),
    sa.Column("priority", sa.Integer, default=0),
    sa.Column("created_at", sa.DateTime),
    sa.Column("state", sa.String(20), index=True, nullable=False),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("payload", sa.Text),
    sa.Column("reasons", sa.Text),
    sa.Column("metrics", sa.Text),
    sa.Column("source", sa.Text),
    sa.Column("received_at", sa.DateTime),
    sa.Column("validated_at", sa.DateTime),
    sa.Column("queued_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("updated_at", sa.DateTime),
)

events = sa.Table(
    "editops_ticket_events", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ticket_id", sa.String(200), index=True),
    sa.Column("state", sa.String(20)),
    sa.Column("at", sa.DateTime),
    sa.Column("detail", sa.Text),
)

locks = sa.Table(
    "editops_locks", metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
)


class LedgerError(EditopsError):
    """The ledger database cannot be reached or is in a state editops does not expect."""


def now() -> datetime:
    """UTC, naive (stored the same way in SQLite and PostgreSQL)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _dumps(x: Any) -> str | None:
    return None if x is None else json.dumps(x, sort_keys=True, default=str, ensure_ascii=False)


def _loads(x: str | None) -> Any:
    return None if x is None else json.loads(x)


def holder_id() -> str:
    """``host:pid:random`` — who holds a lock."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def _holder_dead(holder: str) -> bool:
    """A lock held by a process on this host that no longer exists can be taken at once."""
    try:
        host, pid, _ = holder.split(":")
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError, OSError):
        return False
    return False


@dataclass
class TicketRow:
    """One ledger row, decoded."""

    id: str
    request_id: str | None
    line: str | None
    kind: str | None
    requester: str | None
    priority: int
    created_at: datetime | None
    state: str
    version: int | None
    payload: dict[str, Any] | None
    reasons: Any
    metrics: Any
    source: str | None
    received_at: datetime | None
    validated_at: datetime | None
    queued_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None

    def ticket(self):
        from flows.tickets import Ticket

        return Ticket.from_payload(self.payload)

    def outcome(self) -> dict[str, Any]:
        """What the outbox file says about this ticket."""
        return {
            "id": self.id, "request_id": self.request_id, "line": self.line, "kind": self.kind,
            "requester": self.requester, "state": self.state, "version": self.version,
            "reasons": self.reasons, "metrics": self.metrics, "source": self.source,
            **{k: (getattr(self, k).isoformat() + "Z" if getattr(self, k) else None)
               for k in ("received_at", "validated_at", "queued_at", "finished_at")},
        }


def _row(r) -> TicketRow:
    m = r._mapping
    return TicketRow(
        id=m["id"], request_id=m["request_id"], line=m["line"], kind=m["kind"], requester=m["requester"],
        priority=m["priority"] or 0, created_at=m["created_at"], state=m["state"], version=m["version"],
        payload=_loads(m["payload"]), reasons=_loads(m["reasons"]), metrics=_loads(m["metrics"]),
        source=m["source"], received_at=m["received_at"], validated_at=m["validated_at"],
        queued_at=m["queued_at"], finished_at=m["finished_at"], updated_at=m["updated_at"],
    )


# any fixed 64-bit key; PostgreSQL advisory locks are per database, so every editops ledger shares it
_CREATE_LOCK_KEY = 0x6564_6974_6F70_73  # "editops"


# a lost race to create the tables: another opener made them first, or (SQLite) held the write lock when this
# one's read-then-create transaction or WAL switch needed it (SQLite answers that at once, without busy-waiting)
_LOST_RACE = ("already exists", "database is locked")


def _create_tables(engine: sa.Engine, attempts: int = 10) -> None:
    """Create the missing ledger tables, safe when several processes open a new ledger at once.

    On PostgreSQL the check-then-create runs in one transaction holding an advisory
    lock, so a second process waits and then finds the tables. Elsewhere a lost race
    (:data:`_LOST_RACE`) is retried, so the call returns only once every table exists.
    """
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK_KEY})
                metadata.create_all(conn)
            return
        except (OperationalError, IntegrityError, ProgrammingError) as exc:
            if not any(m in str(exc) for m in _LOST_RACE) or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


class Ledger:
    """Ticket states in any SQLAlchemy database (tables are created on first use)."""

    def __init__(self, url: str):
        self.url = url
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 60}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = sa.create_engine(url, **kwargs)
            if url.startswith("sqlite"):
                @sa.event.listens_for(self.engine, "connect")
                def _wal(dbapi_conn, _):  # concurrent readers while one process writes
                    dbapi_conn.execute("PRAGMA journal_mode=WAL")
                    dbapi_conn.execute("PRAGMA busy_timeout=60000")
            _create_tables(self.engine)
        except (OperationalError, IntegrityError, ProgrammingError) as exc:
            raise LedgerError(f"cannot open the ledger at {_safe_url(url)}: {exc.orig}") from exc

    # -------------------------------------------------------------- writing
    def _event(self, conn, ticket_id: str, state: str, at: datetime, detail: Any = None) -> None:
        conn.execute(events.insert().values(ticket_id=ticket_id, state=state, at=at, detail=_dumps(detail)))

    def add_ticket(self, ticket, source: str | None = None) -> str:
        """Record a validated ticket as queued. Returns ``"queued"``, ``"same"`` (identical
        resubmission, nothing to do) or ``"duplicate"`` (the id exists with other content)."""
        t = now()
        payload = ticket.payload
        row = dict(
            id=ticket.request_id, request_id=ticket.request_id, line=ticket.line, kind=ticket.kind,
            requester=ticket.requester, priority=int(ticket.priority),
            created_at=ticket.created_at.astimezone(timezone.utc).replace(tzinfo=None), state="queued",
            payload=_dumps(payload), source=source, received_at=t, validated_at=t, queued_at=t, updated_at=t,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(tickets.insert().values(**row))
                for s in ("received", "validated", "queued"):
                    self._event(conn, ticket.request_id, s, t, {"source": source} if s == "received" else None)
            return "queued"
        except IntegrityError:
            existing = self.get(ticket.request_id)
            if existing and existing.payload and _same_content(existing.payload, payload):
                return "same"
            return "duplicate"

    def add_invalid(self, key: str, *, reasons: Any, record: Any = None, request_id: str | None = None,
                    line: str | None = None, requester: str | None = None, kind: str | None = None,
                    source: str | None = None) -> bool:
        """Record a row that will not be applied (``invalid`` with its reasons). Idempotent on ``key``."""
        t = now()
        try:
            with self.engine.begin() as conn:
                conn.execute(tickets.insert().values(
                    id=key[:200], request_id=request_id, line=line, kind=kind, requester=requester, priority=0,
                    state="invalid", payload=_dumps({"record": record}), reasons=_dumps(reasons), source=source,
                    received_at=t, finished_at=t, updated_at=t,
                ))
                self._event(conn, key[:200], "received", t, {"source": source})
                self._event(conn, key[:200], "invalid", t, reasons)
            return True
        except IntegrityError:
            return False

    def set_state(self, ids: Sequence[str], state: str, *, version: int | None = None, reasons: Any = None,
                  metrics: Any = None, only_from: Sequence[str] | None = None) -> int:
        """Move tickets to ``state`` (optionally only those now in ``only_from``). Returns how many moved.

        ``metrics`` may be one object for all or a dict keyed by ticket id.
        """
        if state not in STATES:
            raise LedgerError(f"unknown ticket state {state!r}")
        t = now()
        moved = 0
        with self.engine.begin() as conn:
            for tid in ids:
                values: dict[str, Any] = {"state": state, "updated_at": t}
                if state in TERMINAL:
                    values["finished_at"] = t
                if state == "queued":
                    values.update(version=None, finished_at=None)
                if version is not None:
                    values["version"] = version
                if reasons is not None:
                    values["reasons"] = _dumps(reasons.get(tid) if isinstance(reasons, dict) and tid in reasons else reasons)
                m = metrics.get(tid) if isinstance(metrics, dict) and tid in metrics else metrics
                if m is not None:
                    values["metrics"] = _dumps(m)
                q = tickets.update().where(tickets.c.id == tid)
                if only_from:
                    q = q.where(tickets.c.state.in_(list(only_from)))
                n = conn.execute(q.values(**values)).rowcount
                if n:
                    moved += n
                    self._event(conn, tid, state, t, {"version": version} if version is not None else None)
        return moved

    # -------------------------------------------------------------- reading
    def get(self, ticket_id: str) -> TicketRow | None:
        with self.engine.connect() as conn:
            r = conn.execute(tickets.select().where(tickets.c.id == ticket_id)).first()
        return _row(r) if r else None

    def rows(self, *, line: str | None = None, state: str | Sequence[str] | None = None,
             ids: Iterable[str] | None = None) -> list[TicketRow]:
        q = tickets.select()
        if line is not None:
            q = q.where(tickets.c.line == line)
        if state is not None:
            q = q.where(tickets.c.state.in_([state] if isinstance(state, str) else list(state)))
        if ids is not None:
            q = q.where(tickets.c.id.in_(list(ids)))
        q = q.order_by(tickets.c.priority.desc(), tickets.c.created_at, tickets.c.received_at, tickets.c.id)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q)]

    def queued_lines(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(
                sa.select(tickets.c.line).where(tickets.c.state == "queued").distinct()) if r[0])

    def history(self, ticket_id: str) -> list[tuple[str, datetime, Any]]:
        with self.engine.connect() as conn:
            return [(r.state, r.at, _loads(r.detail)) for r in conn.execute(
                events.select().where(events.c.ticket_id == ticket_id).order_by(events.c.seq))]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {s: n for s, n in conn.execute(
                sa.select(tickets.c.state, sa.func.count()).group_by(tickets.c.state))}

    # ---------------------------------------------------------------- locks
    def acquire_lock(self, name: str, holder: str, ttl_s: float = 900.0) -> bool:
        """Take the lease ``name`` if free, expired, or held by a dead local process."""
        t = now()
        exp = t + timedelta(seconds=ttl_s)
        try:
            with self.engine.begin() as conn:
                conn.execute(locks.insert().values(name=name, holder=holder, expires_at=exp))
            return True
        except IntegrityError:
            pass
        with self.engine.connect() as conn:
            cur = conn.execute(locks.select().where(locks.c.name == name)).first()
        if cur is None:
            return self.acquire_lock(name, holder, ttl_s)
        if cur.holder == holder or cur.expires_at < t or _holder_dead(cur.holder):
            with self.engine.begin() as conn:
                n = conn.execute(locks.update().where(locks.c.name == name).where(locks.c.holder == cur.holder)
                                 .values(holder=holder, expires_at=exp)).rowcount
            return n == 1
        return False

    def refresh_lock(self, name: str, holder: str, ttl_s: float = 900.0) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(locks.update().where(locks.c.name == name).where(locks.c.holder == holder)
                                .values(expires_at=now() + timedelta(seconds=ttl_s))).rowcount == 1

    def release_lock(self, name: str, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(locks.delete().where(locks.c.name == name).where(locks.c.holder == holder))

    def lock_holder(self, name: str) -> str | None:
        with self.engine.connect() as conn:
            r = conn.execute(locks.select().where(locks.c.name == name)).first()
        return r.holder if r else None


def _same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal apart from ``created_at`` (a resubmitted file may get a fresh default timestamp)."""
    strip = lambda d: {k: v for k, v in d.items() if k not in ("created_at",)}  # noqa: E731
    return json.loads(_dumps(strip(a))) == json.loads(_dumps(strip(b)))


def _safe_url(url: str) -> str:
    """The URL without its password (never print credentials)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<ledger url>"

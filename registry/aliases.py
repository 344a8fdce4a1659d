"""Aliases: ``candidate`` (newest version that passed its gates) and ``champion`` (in service).

Every move is recorded as an MLflow run in the experiment
``editops-<line>-aliases`` with tags ``editops.alias``, ``editops.from``,
``editops.to``, ``editops.who``, ``editops.why``, ``editops.action``; the run is
opened before the alias moves and marked FINISHED after it, FAILED if the move
failed, so :func:`history` (FINISHED runs, oldest first) is exactly the moves
that happened.

- :func:`promote` moves ``champion`` to a version (default: the ``candidate``).
  ``policy="gates"`` refuses a version whose gates did not pass
  (:class:`PromotionRefusedError`); ``policy="manual"`` trusts the caller.
- :func:`rollback` moves ``champion`` back to an *earlier* version: the one it
  pointed at before its last move, or ``to``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from editing.errors import PromotionRefusedError, RegistryError, VersionNotFoundError

if TYPE_CHECKING:
    from registry.api import Registry

CANDIDATE = "candidate"
CHAMPION = "champion"
POLICIES = ("manual", "gates")


@dataclass
class AliasMove:
    alias: str
    from_version: int | None
    to_version: int
    who: str
    why: str
    action: str
    at_ms: int
    run_id: str = ""


def _experiment(reg: "Registry", line: str) -> str:
    return reg.experiment_id(f"editops-{line}-aliases")


def set_alias(reg: "Registry", line: str, alias: str, version: int, *, who: str | None = None, why: str = "",
              action: str = "set") -> AliasMove:
    """Point ``alias`` at ``version`` and record the move (who, why, from, to)."""
    from registry.api import current_user

    version = int(version)
    reg.version(line, version)  # VersionNotFoundError for a missing one
    before = reg.alias_version(line, alias)
    who = current_user(who)
    now = int(time.time() * 1000)
    tags = {"editops.line": line, "editops.alias": alias, "editops.from": "" if before is None else str(before),
            "editops.to": str(version), "editops.who": who, "editops.why": why or "", "editops.action": action}
    run = reg._call("record alias move", reg.client.create_run, _experiment(reg, line),
                    run_name=f"{action} {alias} → v{version}", tags=tags)
    try:
        reg._call(f"set alias {alias}", reg.client.set_registered_model_alias, line, alias, str(version))
    except Exception:
        try:
            reg.client.set_terminated(run.info.run_id, "FAILED")
        except Exception:
            pass
        raise
    reg._call("record alias move", reg.client.set_terminated, run.info.run_id, "FINISHED")
    return AliasMove(alias, before, version, who, why or "", action, now, run.info.run_id)


def history(reg: "Registry", line: str, alias: str | None = None) -> list[AliasMove]:
    """Recorded alias moves of ``line`` (optionally of one alias), oldest first."""
    exp = reg.client.get_experiment_by_name(f"editops-{line}-aliases")
    if exp is None:
        return []
    flt = "attributes.status = 'FINISHED'"
    if alias:
        flt += f" and tags.`editops.alias` = '{alias}'"
    runs = reg._call("read alias history", reg.client.search_runs, [exp.experiment_id], flt,
                     max_results=5000, order_by=["attributes.start_time ASC"])
    out = []
    for r in runs:
        t = r.data.tags
        out.append(AliasMove(alias=t.get("editops.alias", ""),
                             from_version=int(t["editops.from"]) if t.get("editops.from") else None,
                             to_version=int(t["editops.to"]), who=t.get("editops.who", ""), why=t.get("editops.why", ""),
                             action=t.get("editops.action", ""), at_ms=int(r.info.start_time or 0),
                             run_id=r.info.run_id))
    return out


def promote(reg: "Registry", line: str, version: int | None = None, *, who: str | None = None, why: str = "",
            policy: str = "manual") -> AliasMove:
    """Move ``champion`` to ``version`` (default: the current ``candidate``)."""
    if policy not in POLICIES:
        raise RegistryError(f"unknown promotion policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if version is None:
        version = reg.alias_version(line, CANDIDATE)
        if version is None:
            raise VersionNotFoundError(f"line {line!r} has no candidate; name the version to promote")
    v = reg.version(line, int(version))
    if policy == "gates" and v.gates_passed is not True:
        state = "failed" if v.gates_passed is False else "have no recorded result"
        raise PromotionRefusedError(
            f"version {v.number} of {line!r} was not promoted: its gates {state} and the policy is 'gates'. "
            "Promote a version that passed, or use --policy manual with a reason")
    return set_alias(reg, line, CHAMPION, v.number, who=who, why=why or f"promote ({policy})", action="promote")


def rollback(reg: "Registry", line: str, to: int | None = None, *, who: str | None = None, why: str = "") -> AliasMove:
    """Move ``champion`` back to an earlier version (default: where it pointed before its last move)."""
    current = reg.alias_version(line, CHAMPION)
    if current is None:
        raise VersionNotFoundError(f"line {line!r} has no champion to roll back")
    if to is None:
        moves = [m for m in history(reg, line, CHAMPION) if m.to_version == current and m.from_version is not None]
        earlier = [m.from_version for m in moves if m.from_version < current]
        if not earlier:
            raise VersionNotFoundError(
                f"champion of {line!r} (version {current}) has no earlier champion on record; give --to VERSION")
        to = earlier[-1]
    if int(to) >= current:
        raise PromotionRefusedError(
            f"rollback goes back: version {to} is not earlier than the champion {current}; use promote to move forward")
    return set_alias(reg, line, CHAMPION, int(to), who=who, why=why or "rollback", action="rollback")

"""Tickets: what a requester files, and how each becomes an edit request.

A *fact ticket* asks a model line to change a fact (subject, prompt, new target,
optional true target, relation, paraphrases and neighbour probes). A *deletion
ticket* asks it to stop a behaviour (source, unwanted output, one correct output,
optional generalisation/locality probes). Both carry ``request_id``, ``line``,
``requester``, ``priority`` (higher first, 0-9) and ``created_at``.

``Ticket.to_request()`` gives the :class:`editing.requests.FactRequest` /
:class:`DeletionRequest` the editors take. ``Ticket.payload`` is the JSON form
stored in the ledger (``Ticket.from_payload`` reads it back).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict
from datetime import datetime, timezone
from typing import Any

from editing.requests import DeletionRequest, FactRequest, Probe, TranslationProbe

COMMON_FIELDS = ("request_id", "line", "kind", "requester", "priority", "created_at")
FACT_FIELDS = ("subject", "prompt", "target_new", "target_true", "relation", "paraphrases", "neighbours")
DELETION_FIELDS = ("source", "unwanted", "positive", "behaviour", "generalization", "locality")
ALL_FIELDS = COMMON_FIELDS + FACT_FIELDS + DELETION_FIELDS


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Ticket:
    """Fields every ticket has."""

    request_id: str
    line: str
    requester: str
    priority: int = 0
    created_at: datetime = field(default_factory=utcnow)

    kind = "ticket"

    @property
    def payload(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind
        d["created_at"] = self.created_at.isoformat()
        return d

    def payload_json(self) -> str:
        return json.dumps(self.payload, sort_keys=True, ensure_ascii=False)

    @staticmethod
    def from_payload(d: dict[str, Any]) -> "Ticket":
        d = dict(d)
        kind = d.pop("kind", None)
        if isinstance(d.get("created_at"), str):
            d["created_at"] = datetime.fromisoformat(d["created_at"])
        cls = {"fact": FactTicket, "deletion": DeletionTicket}.get(kind)
        if cls is None:
            raise ValueError(f"unknown ticket kind {kind!r}")
        if cls is FactTicket:
            d["paraphrases"] = tuple(d.get("paraphrases") or ())
            d["neighbours"] = tuple(tuple(x) for x in d.get("neighbours") or ())
        else:
            d["generalization"] = tuple(tuple(x) for x in d.get("generalization") or ())
            d["locality"] = tuple(tuple(x) for x in d.get("locality") or ())
        return cls(**d)


@dataclass(frozen=True)
class FactTicket(Ticket):
    """Change ``prompt.format(subject)``'s completion to ``target_new``.

    ``neighbours`` are ``(prompt, target)`` pairs about other subjects whose answers must stay.
    """

    subject: str = ""
    prompt: str = ""
    target_new: str = ""
    target_true: str | None = None
    relation: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[tuple[str, str], ...] = ()

    kind = "fact"

    @property
    def contradiction_keys(self) -> list[tuple[str, ...]]:
        """Two fact tickets with a common key and different targets contradict each other."""
        keys = [("prompt", self.line, self.prompt.replace("{}", self.subject).strip().lower())]
        if self.relation:
            keys.append(("relation", self.line, self.subject.strip().lower(), self.relation.strip().lower()))
        return keys

    @property
    def target_key(self) -> str:
        return self.target_new.strip().lower()

    def to_request(self) -> FactRequest:
        return FactRequest(
            request_id=self.request_id, prompt=self.prompt, subject=self.subject, target_new=self.target_new,
            target_true=self.target_true, relation=self.relation, paraphrases=tuple(self.paraphrases),
            neighbours=tuple(Probe(p, t) for p, t in self.neighbours),
        )


@dataclass(frozen=True)
class DeletionTicket(Ticket):
    """Stop producing ``unwanted`` for ``source``; ``positive`` is one correct output.

    ``generalization`` are ``(source, unwanted)`` pairs with the same trigger;
    ``locality`` are ``(source, reference)`` pairs whose outputs must stay.
    """

    source: str = ""
    unwanted: str = ""
    positive: str = ""
    behaviour: str | None = None
    generalization: tuple[tuple[str, str], ...] = ()
    locality: tuple[tuple[str, str], ...] = ()

    kind = "deletion"

    @property
    def contradiction_keys(self) -> list[tuple[str, ...]]:
        return [("source", self.line, self.source.strip().lower(), self.unwanted.strip().lower())]

    @property
    def target_key(self) -> str:
        return self.positive.strip().lower()

    def to_request(self) -> DeletionRequest:
        return DeletionRequest(
            request_id=self.request_id, source=self.source, unwanted=self.unwanted, positive=self.positive,
            behaviour=self.behaviour,
            generalization=tuple(TranslationProbe(source=s, unwanted=u) for s, u in self.generalization),
            locality=tuple(TranslationProbe(source=s, reference=r) for s, r in self.locality),
        )


def ticket_from_request(request, line: str, requester: str, priority: int = 0) -> Ticket:
    """A ticket for an existing :class:`FactRequest`/:class:`DeletionRequest` (e.g. from a request file)."""
    if isinstance(request, FactRequest):
        return FactTicket(
            request_id=request.request_id, line=line, requester=requester, priority=priority,
            subject=request.subject, prompt=request.prompt, target_new=request.target_new,
            target_true=request.target_true, relation=request.relation, paraphrases=tuple(request.paraphrases),
            neighbours=tuple((p.prompt, p.target) for p in request.neighbours),
        )
    if isinstance(request, DeletionRequest):
        return DeletionTicket(
            request_id=request.request_id, line=line, requester=requester, priority=priority,
            source=request.source, unwanted=request.unwanted, positive=request.positive, behaviour=request.behaviour,
            generalization=tuple((p.source, p.unwanted or "") for p in request.generalization),
            locality=tuple((p.source, p.reference or "") for p in request.locality),
        )
    raise TypeError(f"not an edit request: {type(request).__name__}")

"""Locality gates: may an edited model be registered? A verdict per gate, per ticket and per batch.

Every figure comes from the project's metrics (:mod:`editing.metrics.facts`,
:mod:`editing.metrics.deletion`, :mod:`editing.metrics.text`) and every locality
figure is measured against the BASE model's cached outputs, never the edited
model's. Gates (thresholds in :class:`GateThresholds`, configured per model line):

fact tickets
  - ``efficacy`` (per ticket): P(new) > P(true) on the edit prompt (mean token
    log-prob; without a true target: the new target is top-1). Passes at ≥ threshold (1 = must).
  - ``paraphrase`` (per ticket): share of the ticket's paraphrases where the new target wins.
  - ``neighbourhood`` (per ticket): share of the ticket's neighbour-answer tokens whose argmax
    equals the BASE model's (EasyEdit token-agreement locality).
  - ``perplexity_drift`` (batch): ppl_edited / ppl_base − 1 on held-out text ≤ threshold.
  - ``retention`` (batch): share of all earlier edits of the line that still hold (efficacy).
deletion tickets
  - ``deletion_gone`` (per ticket): the unwanted span is gone from the source's output.
  - ``unrelated_unchanged`` (batch): share of unrelated sources translated exactly as by BASE.
  - ``retention`` (batch): share of earlier deletions still gone. Its default is 1.0 on deletion lines
    (:data:`KIND_DEFAULTS`): a deletion that brings back an earlier one (an offensive word, say) fails its batch.
    Fact lines keep 0.8: there an earlier edit eroding a little is what sequential editing trades.

A gate whose metric cannot be computed (no paraphrases, no held-out text, no
earlier edits) is recorded as ``skipped`` and does not fail the batch.
Pure torch + transformers: no MLflow, no Prefect.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from editing.requests import DeletionRequest, FactRequest


@dataclass
class GateThresholds:
    """Minimum shares (0-1) and maximum drift a batch must meet (see module docstring). The field defaults are a
    fact line's; :meth:`from_dict` with ``kind`` applies a line kind's own (:data:`KIND_DEFAULTS`) under the
    configured values."""

    efficacy: float = 1.0
    paraphrase: float = 0.0
    neighbourhood: float = 0.6
    perplexity_drift: float = 0.25
    retention: float = 0.8
    deletion_gone: float = 1.0
    unrelated_unchanged: float = 0.9

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, kind: str = "fact") -> "GateThresholds":
        """Thresholds configured for a line of ``kind``: its kind's defaults, then the values given in ``d``."""
        from editing.errors import EditopsError

        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EditopsError(f"unknown gate(s) {unknown}; known gates: {sorted(known)}")
        return cls(**{**KIND_DEFAULTS.get(kind, {}), **{k: float(v) for k, v in d.items()}})


# a line kind's defaults where they differ from the field defaults (module docstring)
KIND_DEFAULTS: dict[str, dict[str, float]] = {"deletion": {"retention": 1.0}}


@dataclass
class GateResult:
    """One gate's verdict: ``metric`` compared with ``threshold`` by ``op`` (``>=`` or ``<=``)."""

    gate: str
    scope: str  # "ticket" | "batch"
    metric: float | None
    threshold: float
    op: str = ">="
    request_id: str | None = None

    @property
    def verdict(self) -> str:
        if self.metric is None:
            return "skipped"
        ok = self.metric >= self.threshold - 1e-12 if self.op == ">=" else self.metric <= self.threshold + 1e-12
        return "pass" if ok else "fail"

    @property
    def passed(self) -> bool:
        return self.verdict != "fail"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


@dataclass
class GateReport:
    """All gates of one edited batch."""

    request_ids: list[str]
    results: list[GateResult] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failed(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def failed_tickets(self) -> dict[str, list[GateResult]]:
        """Tickets that failed a per-ticket gate, with those gates."""
        out: dict[str, list[GateResult]] = {}
        for r in self.failed():
            if r.scope == "ticket" and r.request_id:
                out.setdefault(r.request_id, []).append(r)
        return out

    def batch_failures(self) -> list[GateResult]:
        return [r for r in self.failed() if r.scope == "batch"]

    def for_ticket(self, request_id: str) -> list[dict[str, Any]]:
        """The ticket's own gates plus the batch gates (what its ledger entry records)."""
        return [r.to_dict() for r in self.results if r.request_id in (None, request_id)]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "request_ids": list(self.request_ids),
                "gates": [r.to_dict() for r in self.results], "metrics": self.metrics}

    def to_markdown(self) -> str:
        lines = ["| gate | scope | ticket | metric | threshold | verdict |", "|---|---|---|---|---|---|"]
        for r in self.results:
            m = "–" if r.metric is None else f"{r.metric:.3f}"
            lines.append(f"| {r.gate} | {r.scope} | {r.request_id or ''} | {m} | {r.op} {r.threshold:g} | {r.verdict} |")
        return "\n".join(lines)


def _first(*xs: float | None) -> float | None:
    for x in xs:
        if x is not None:
            return float(x)
    return None


def fact_gates(model, tokenizer, requests: Sequence[FactRequest], base, thresholds: GateThresholds, *,
               earlier: Sequence[FactRequest] = (), heldout_texts: Sequence[str] | None = None) -> GateReport:
    """Gates for fact edits. ``base`` is a :class:`editing.metrics.facts.BaseOutputs` holding the
    BASE model's scores for ``requests`` (and its perplexity on ``heldout_texts``)."""
    from editing.metrics.facts import evaluate_facts

    scores = evaluate_facts(model, tokenizer, list(requests), base=base, heldout_texts=heldout_texts or None,
                            earlier=list(earlier) or None)
    rep = GateReport([r.request_id for r in requests], metrics=_clean(scores.summary()))
    t = thresholds
    for row in scores.per_request:
        rid = row.request_id
        rep.results.append(GateResult("efficacy", "ticket", _first(row.efficacy, row.efficacy_acc), t.efficacy, request_id=rid))
        rep.results.append(GateResult("paraphrase", "ticket", _first(row.paraphrase, row.paraphrase_acc), t.paraphrase,
                                      request_id=rid))
        rep.results.append(GateResult("neighbourhood", "ticket", row.locality, t.neighbourhood, request_id=rid))
    rep.results.append(GateResult("perplexity_drift", "batch", scores.perplexity_drift, t.perplexity_drift, op="<="))
    rep.results.append(GateResult("retention", "batch", scores.retention if earlier else None, t.retention))
    return rep


def deletion_gates(model, tokenizer, requests: Sequence[DeletionRequest], base_outputs: Mapping[str, str],
                   thresholds: GateThresholds, *, earlier: Sequence[DeletionRequest] = ()) -> GateReport:
    """Gates for behaviour deletions. ``base_outputs`` are the BASE model's outputs on the
    unrelated sources (:func:`editing.metrics.deletion.cache_base_outputs`)."""
    from editing.metrics.deletion import evaluate_deletions

    report = evaluate_deletions(model, tokenizer, list(requests), base_outputs)
    rep = GateReport([r.request_id for r in requests], metrics=_clean(report.summary()))
    t = thresholds
    for s in report.per_request:
        rep.results.append(GateResult("deletion_gone", "ticket", float(s.instance_gone), t.deletion_gone,
                                      request_id=s.request_id))
    rep.results.append(GateResult("unrelated_unchanged", "batch", report.locality_exact, t.unrelated_unchanged))
    retention = None
    if earlier:
        retention = evaluate_deletions(model, tokenizer, list(earlier)).instance_gone
        rep.metrics["retention"] = retention
    rep.results.append(GateResult("retention", "batch", retention, t.retention))
    return rep


def _clean(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in d.items() if v is None or isinstance(v, (int, float, str, bool))}

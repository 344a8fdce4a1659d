"""What a registered version measured: its gate figures and its diff, read back from its artifacts.

A version registered by the pipeline carries ``gate_report.json`` (the
:meth:`editing.gates.GateReport.to_dict` of its batch) and ``diff.json`` (the
:class:`registry.diffs.DiffReport` against its parent), both sha256-checked on
read (:func:`registry.materialize.fetch_artifact`). This module turns them into
the figures tables show:

- :func:`gate_figures`: one :class:`GateFigure` per gate, in the report's order. A
  per-ticket gate's ``value`` is the mean of its tickets' metrics and ``worst`` the
  one that decides the verdict (min for ``>=`` gates, max for ``<=`` gates); a
  batch gate has one metric (``value == worst``). A gate whose metric could not be
  computed (no paraphrases, no held-out text, no earlier edits) has ``value None``
  and verdict ``skipped``.
- :func:`diff_summary`: edited weights, total ‖ΔW‖_F, largest rank, probes whose
  top answer changed.

Versions registered without a report (the base, reverts, hand registrations)
give ``None``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

from registry.versions import Version

if TYPE_CHECKING:
    from registry.api import Registry

GATE_REPORT_FILE = "gate_report.json"
DIFF_FILE = "diff.json"


@dataclass
class GateFigure:
    """One gate of one version: the measured figure against its threshold."""

    gate: str
    scope: str           # "ticket" | "batch"
    value: float | None  # mean over tickets (ticket gates) or the batch metric
    worst: float | None  # the figure that decides the verdict
    threshold: float
    op: str              # ">=" | "<="
    verdict: str         # "pass" | "fail" | "skipped"
    n: int               # tickets (or 1 for a batch gate) with a computed metric

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def short(self) -> str:
        """``efficacy 1.00`` / ``perplexity_drift +0.012`` / ``retention –`` (failed gates marked ✗)."""
        if self.value is None:
            return f"{self.gate} –"
        text = f"{self.value:+.3f}" if self.op == "<=" else f"{self.value:.2f}"
        return f"{self.gate} {text}{' ✗' if self.verdict == 'fail' else ''}"


def gate_figures(report: Mapping[str, Any] | None) -> list[GateFigure]:
    """The gates of a gate report (``GateReport.to_dict()``), aggregated per gate (module docstring)."""
    if not report:
        return []
    by_gate: dict[str, list[Mapping[str, Any]]] = {}
    for g in report.get("gates", []):
        by_gate.setdefault(g["gate"], []).append(g)
    out = []
    for name, rows in by_gate.items():
        op = rows[0].get("op", ">=")
        vals = [float(r["metric"]) for r in rows if r.get("metric") is not None]
        verdicts = {r.get("verdict") for r in rows}
        verdict = "fail" if "fail" in verdicts else "pass" if "pass" in verdicts else "skipped"
        out.append(GateFigure(
            gate=name, scope=rows[0].get("scope", "batch"), value=sum(vals) / len(vals) if vals else None,
            worst=(min(vals) if op == ">=" else max(vals)) if vals else None, threshold=float(rows[0]["threshold"]),
            op=op, verdict=verdict, n=len(vals)))
    return out


def gate_report(reg: "Registry", version: Version) -> dict[str, Any] | None:
    """The version's ``gate_report.json`` (sha256-checked), or None when it was registered without one."""
    import json

    from registry.materialize import fetch_artifact

    if GATE_REPORT_FILE not in version.artifact_sha256:
        return None
    return json.loads(fetch_artifact(reg, version, GATE_REPORT_FILE).read_text())


def version_diff(reg: "Registry", version: Version):
    """The :class:`~registry.diffs.DiffReport` registered with the version (against its parent), or None."""
    import json

    from registry.diffs import DiffReport
    from registry.materialize import fetch_artifact

    if DIFF_FILE not in version.artifact_sha256:
        return None
    return DiffReport.from_dict(json.loads(fetch_artifact(reg, version, DIFF_FILE).read_text()))


def diff_summary(diff) -> dict[str, Any] | None:
    """``{weights, total_norm, max_rank, probes, changed}`` of a DiffReport (None for None)."""
    if diff is None:
        return None
    return {"weights": len(diff.layers), "total_norm": sum(x.norm ** 2 for x in diff.layers) ** 0.5,
            "max_rank": max((x.rank for x in diff.layers), default=0), "probes": len(diff.probes),
            "changed": len(diff.changed_probes)}


def version_report(reg: "Registry", version: Version) -> dict[str, Any]:
    """A version's summary plus its gate figures (``gates``) and diff summary (``diff``), JSON-able."""
    figs = gate_figures(gate_report(reg, version))
    return {**version.summary(), "gates": [f.to_dict() for f in figs] or None,
            "diff": diff_summary(version_diff(reg, version))}

"""Diffs between two versions: what changed in the weights and in behaviour.

Weight diff of ``a → b``: the net delta ``N = Σ(deltas only on b's chain) −
Σ(deltas only on a's chain)`` (chains meet at their last common ancestor), per
edited weight ``‖N‖_F`` (from the factors: ``‖U Vᵀ‖²_F = Σ (UᵀU ⊙ VᵀV)``) and its
numerical rank (singular values of the factored form above ``1e-6 · σ_max``,
computed by :meth:`LowRankDelta.compact`, never densely). Affected requests:
the request ids added and removed along the way.

Behaviour diff on a fixed probe set (prompts, each with an optional target):
next-token distribution of both models at the end of each prompt; a probe
*changed* when its top-1 token differs; probabilities of the top token and of
the target's first token are reported for both.

A :class:`DiffReport` is written as ``diff.json``, ``diff.md``, ``diff.html`` and
``diff.png`` (matplotlib) and logged to MLflow with the version.
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from editing.delta import LowRankDelta


@dataclass
class LayerDiff:
    weight: str
    norm: float
    rank: int
    layer: int | None = None


@dataclass
class ProbeDiff:
    prompt: str
    top_a: str
    top_b: str
    p_top_a: float
    p_top_b: float
    target: str | None = None
    p_target_a: float | None = None
    p_target_b: float | None = None

    @property
    def changed(self) -> bool:
        return self.top_a != self.top_b

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changed": self.changed}


@dataclass
class DiffReport:
    """Everything that differs between version ``a`` and version ``b`` of ``line``."""

    line: str
    a: int | None
    b: int
    layers: list[LayerDiff] = field(default_factory=list)
    added_requests: list[str] = field(default_factory=list)
    removed_requests: list[str] = field(default_factory=list)
    probes: list[ProbeDiff] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def changed_probes(self) -> list[ProbeDiff]:
        return [p for p in self.probes if p.changed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "line": self.line, "a": self.a, "b": self.b,
            "layers": [asdict(x) for x in self.layers],
            "added_requests": self.added_requests, "removed_requests": self.removed_requests,
            "probes": [p.to_dict() for p in self.probes],
            "summary": {"n_layers": len(self.layers), "total_norm": sum(x.norm**2 for x in self.layers) ** 0.5,
                        "n_probes": len(self.probes), "n_changed": len(self.changed_probes)},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffReport":
        probes = [ProbeDiff(**{k: v for k, v in p.items() if k != "changed"}) for p in d.get("probes", [])]
        return cls(line=d["line"], a=d.get("a"), b=d["b"], layers=[LayerDiff(**x) for x in d.get("layers", [])],
                   added_requests=list(d.get("added_requests", [])), removed_requests=list(d.get("removed_requests", [])),
                   probes=probes, meta=dict(d.get("meta", {})))

    # ---------------------------------------------------------------- renderings
    def to_markdown(self) -> str:
        s = self.to_dict()["summary"]
        out = [f"# {self.line}: version {self.a} → {self.b}", "",
               f"Edited weights: {s['n_layers']}, total ‖ΔW‖_F = {s['total_norm']:.4g}. "
               f"Probes whose top answer changed: {s['n_changed']} of {s['n_probes']}.", ""]
        if self.added_requests or self.removed_requests:
            out += [f"Requests added: {', '.join(self.added_requests) or '—'}",
                    f"Requests removed: {', '.join(self.removed_requests) or '—'}", ""]
        if self.layers:
            out += ["| weight | ‖ΔW‖_F | rank |", "|---|---:|---:|"]
            out += [f"| `{x.weight}` | {x.norm:.4g} | {x.rank} |" for x in self.layers]
            out.append("")
        if self.probes:
            out += ["| prompt | top a (p) | top b (p) | target | p(target) a → b | changed |", "|---|---|---|---|---|:-:|"]
            for p in self.probes:
                tgt = "" if p.p_target_a is None else f"{p.p_target_a:.3f} → {p.p_target_b:.3f}"
                out.append(f"| {p.prompt} | `{p.top_a}` ({p.p_top_a:.3f}) | `{p.top_b}` ({p.p_top_b:.3f}) | "
                           f"{p.target or ''} | {tgt} | {'✔' if p.changed else ''} |")
            out.append("")
        out.append("![diff](diff.png)")
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        body = []
        for line in self.to_markdown().splitlines():
            if line.startswith("# "):
                body.append(f"<h1>{html.escape(line[2:])}</h1>")
            elif line.startswith("|") and not re.match(r"^\|[-:| ]+\|$", line):
                cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
                body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            elif line.startswith("!["):
                body.append('<img src="diff.png" alt="diff plot">')
            elif line and not line.startswith("|"):
                body.append(f"<p>{html.escape(line)}</p>")
        text = "\n".join(body)
        text = re.sub(r"((?:<tr>.*</tr>\n?)+)", r"<table border='1'>\n\1</table>\n", text)
        return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.line)}</title></head><body>{text}</body></html>"

    def plot(self, path: str | Path) -> Path:
        """PNG: ‖ΔW‖ per edited weight, and p(target) (or p(top)) of each probe in a vs b."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        ax = axes[0]
        if self.layers:
            labels = [x.weight.replace(".weight", "").split(".")[-3:] for x in self.layers]
            ax.bar(range(len(self.layers)), [x.norm for x in self.layers], color="tab:blue")
            ax.set_xticks(range(len(self.layers)), [".".join(x) for x in labels], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("‖ΔW‖_F")
        ax.set_title("weight change per edited matrix")
        ax = axes[1]
        if self.probes:
            use_t = all(p.p_target_a is not None for p in self.probes)
            xs = [p.p_target_a if use_t else p.p_top_a for p in self.probes]
            ys = [p.p_target_b if use_t else p.p_top_b for p in self.probes]
            colors = ["tab:red" if p.changed else "tab:gray" for p in self.probes]
            ax.scatter(xs, ys, c=colors, s=18)
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_xlabel(f"p({'target' if use_t else 'top'}) in v{self.a}")
            ax.set_ylabel(f"p({'target' if use_t else 'top'}) in v{self.b}")
        ax.set_title("probes (red: top answer changed)")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path

    def write(self, directory: str | Path) -> list[Path]:
        """Write ``diff.json``, ``diff.md``, ``diff.html``, ``diff.png`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "diff.json").write_text(json.dumps(self.to_dict(), indent=2, default=str))
        (d / "diff.md").write_text(self.to_markdown())
        (d / "diff.html").write_text(self.to_html())
        return [d / "diff.json", d / "diff.md", d / "diff.html", self.plot(d / "diff.png")]


# ------------------------------------------------------------------------ compute
def net_delta(added: Sequence[LowRankDelta], removed: Sequence[LowRankDelta] = ()) -> LowRankDelta | None:
    """``Σ added − Σ removed`` as one (uncompacted) factored delta; None when both are empty."""
    parts = [d for d in added if d.factors] + [d.negate() for d in removed if d.factors]
    parts = [p for p in parts if p.kind == "weight"]
    return LowRankDelta.sum(parts) if parts else None


_LAYER = re.compile(r"\.(\d+)\.")


def weight_diff(delta: LowRankDelta | None, rtol: float = 1e-6) -> list[LayerDiff]:
    """Per edited weight: ``‖ΔW‖_F`` and numerical rank of the (net) delta."""
    if delta is None:
        return []
    norms = delta.norms()
    compact = delta.compact(rtol=rtol)
    out = []
    for name in delta.weight_names:
        m = _LAYER.search(name)
        rank = compact.rank(name) if norms[name] > 0 else 0
        out.append(LayerDiff(weight=name, norm=norms[name], rank=rank, layer=int(m.group(1)) if m else None))
    return out


def normalise_probes(probes: Iterable[Any]) -> list[dict[str, str | None]]:
    """Strings, ``{"prompt", "target"}`` dicts, :class:`editing.requests.Probe` or FactRequests."""
    out = []
    for p in probes or []:
        if isinstance(p, str):
            out.append({"prompt": p, "target": None})
        elif isinstance(p, dict):
            out.append({"prompt": p["prompt"], "target": p.get("target")})
        elif hasattr(p, "text") and hasattr(p, "target_new"):
            out.append({"prompt": p.text, "target": p.target_new})
        else:
            out.append({"prompt": p.prompt, "target": getattr(p, "target", None)})
    return out


@dataclass
class ProbeReading:
    top: str
    p_top: float
    p_target: float | None


def _target_token(tokenizer, prompt: str, target: str) -> int | None:
    base = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    sep = "" if prompt.endswith(" ") or target.startswith(" ") else " "
    full = tokenizer(prompt + sep + target, add_special_tokens=True)["input_ids"]
    if len(full) > len(base) and full[: len(base)] == base:
        return int(full[len(base)])
    ids = tokenizer(sep + target, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else None


@torch.no_grad()
def read_probes(model, tokenizer, probes: Sequence[dict[str, str | None]]) -> list[ProbeReading]:
    """Next-token top-1 and target probability of a causal LM at the end of each prompt."""
    out = []
    for p in probes:
        enc = tokenizer(p["prompt"], return_tensors="pt")
        logits = model(**enc).logits[0, -1].double()
        probs = torch.softmax(logits, -1)
        top = int(probs.argmax())
        tgt = _target_token(tokenizer, p["prompt"], p["target"]) if p.get("target") else None
        out.append(ProbeReading(top=tokenizer.decode([top]), p_top=float(probs[top]),
                                p_target=None if tgt is None else float(probs[tgt])))
    return out


def behaviour_diff(readings_a: Sequence[ProbeReading], readings_b: Sequence[ProbeReading],
                   probes: Sequence[dict[str, str | None]]) -> list[ProbeDiff]:
    return [ProbeDiff(prompt=str(p["prompt"]), target=p.get("target"), top_a=a.top, top_b=b.top, p_top_a=a.p_top,
                      p_top_b=b.p_top, p_target_a=a.p_target, p_target_b=b.p_target)
            for p, a, b in zip(probes, readings_a, readings_b)]

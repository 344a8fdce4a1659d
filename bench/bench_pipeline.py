"""Pipeline overhead (flow + ledger + registry) as a share of edit time, for N tickets.

    .venv/bin/python bench/bench_pipeline.py --tickets 100 --batch-size 10 --engine both

Model: ``models/factworld-gpt2`` with ``data/requests/factworld.jsonl`` when built (``dvc repro
factworld``), else a tiny fact GPT-2 built on the spot (editing.training.causal.build_tiny_fact_model).
Editor ``nse`` (one layer, short value optimisation), gates wide open so every batch is registered
once (no bisection): the figure is the cost of the machinery around the edits. Prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPEN_GATES = {"efficacy": 0.0, "paraphrase": 0.0, "neighbourhood": 0.0, "perplexity_drift": 1e9, "retention": 0.0}


def _model(tmp: Path) -> tuple[Path, Path]:
    m, r = ROOT / "models/factworld-gpt2", ROOT / "data/requests/factworld.jsonl"
    if (m / "config.json").is_file() and r.is_file():
        return m, r
    from editing.training.causal import build_tiny_fact_model

    p = build_tiny_fact_model(tmp / "tiny", seed=0)
    return p.model_dir, p.requests_path


def run(engine: str, n: int, batch: int, tmp: Path, model_dir: Path, req_path: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    from editing.env import configure_offline_defaults
    from editing.gates import GateThresholds
    from flows.config import LineConfig, ProjectConfig, write_config
    from flows.pipeline import run_once
    from flows.tickets import ticket_from_request
    from editing.formats import read_requests

    configure_offline_defaults()
    root = tmp / engine
    shutil.rmtree(root, ignore_errors=True)
    wd = root / ".editops"
    line = LineConfig(name="bench-facts", base_model=str(model_dir), kind="fact", editor="nse", batch_size=batch,
                      hyperparameters={"layers": [0], "lam": 30.0, "corpus": "samples:8", "stats_dir": str(tmp / "stats"),
                                       "value": {"context_templates": ["{}"], "steps": 10}},
                      gates=GateThresholds.from_dict(OPEN_GATES), promotion="auto")
    cfg = ProjectConfig(root=root, workdir=wd, lines={line.name: line}, ledger_url=f"sqlite:///{wd}/ledger.db",
                        tracking_uri=f"sqlite:///{wd}/mlflow.db", artifact_root=wd / "artifacts")
    path = write_config(cfg, root / "editops.yaml")
    cfg.ensure_dirs()
    reqs = read_requests(req_path)
    seen, picked = set(), []
    for r in reqs:  # one ticket per subject+relation (no contradictions)
        if (r.subject, r.relation) not in seen:
            seen.add((r.subject, r.relation))
            picked.append(r)
        if len(picked) == n:
            break
    (cfg.inbox / "bench.json").write_text(json.dumps([ticket_from_request(r, line.name, "bench").payload for r in picked]))
    t0 = time.perf_counter()
    out = run_once(str(path) if engine == "prefect" else cfg, engine=engine, say=lambda *_: None) \
        if engine == "local" else run_once(str(path), engine="prefect")
    wall = time.perf_counter() - t0
    t = out["timings"] if isinstance(out, dict) else out.to_dict()["timings"]
    lines = out["lines"] if isinstance(out, dict) else out.to_dict()["lines"]
    return {"engine": engine, "tickets": len(picked), "applied": sum(len(l["applied"]) for l in lines),
            "versions": sum(len(l["versions"]) for l in lines), "wall": wall, **t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tickets", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--engine", choices=["local", "prefect", "both"], default="both")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="editops-bench-"))
    model_dir, req_path = _model(tmp)
    rows = [run(e, a.tickets, a.batch_size, tmp, model_dir, req_path)
            for e in (["local", "prefect"] if a.engine == "both" else [a.engine])]
    print(f"\nmodel {model_dir}, {a.tickets} tickets, batches of {a.batch_size}\n")
    hdr = ("engine", "applied", "versions", "edit s", "gates s", "register s", "ledger s", "intake s", "materialise s",
           "base-out s", "other s", "wall s", "overhead/edit")
    print(" | ".join(hdr))
    for r in rows:
        other = r["wall"] - sum(r[k] for k in ("edit", "gates", "register", "ledger", "intake", "materialize",
                                                "base_outputs"))
        overhead = r["wall"] - r["edit"] - r["gates"] - r["base_outputs"]
        print(" | ".join([r["engine"], str(r["applied"]), str(r["versions"])] + [f"{r[k]:.1f}" for k in
              ("edit", "gates", "register", "ledger", "intake", "materialize", "base_outputs")]
              + [f"{other:.1f}", f"{r['wall']:.1f}", f"{overhead / r['edit']:.2f}"]))
    print("\noverhead = wall − edit − gates − base outputs (flow, registry, ledger, intake, materialisation, report)")


if __name__ == "__main__":
    main()

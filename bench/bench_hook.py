"""Hook-layer editor (CoachHooK style) beside the neuron-level editor, on the project's fact models.

One command::

    .venv/bin/python bench/bench_hook.py [--models smollm2,factworld] [--editors hook,nse]
        [--limit 20] [--batch-size 10] [--hook-set key=value ...] [--nse-set key=value ...]

For each model (skipped with a note when its DVC-built directory is missing) and
each editor, in the same process run: load the model, apply the first ``--limit``
requests of the model's request set in batches (:func:`editing.runner.run_sequential`),
then score all of them against the cached base outputs
(:mod:`editing.metrics.facts`: efficacy / paraphrase = P(new) > P(true), mean
token log-prob; neighbourhood = P(own answer) > P(new); perplexity drift =
ppl/base − 1 on held-out text) and, for the hook editor, the hook firing rate =
share of held-out-text tokens at which any hook fires
(:func:`editing.editors.hook.hook_firing_rate`). Prints one table and writes
``bench/results/hook.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def run_model(model, editors: list[str], limit: int, batch_size: int, sets: dict[str, dict], cache_dir: Path,
              n_fire_texts: int) -> list[dict]:
    import torch

    from bench_facts import _base_outputs
    from editing.editors import get_editor
    from editing.editors.hook import hook_firing_rate
    from editing.formats import read_requests
    from editing.metrics.facts import evaluate_facts
    from editing.metrics.text import heldout_texts
    from editing.models import load
    from editing.runner import run_sequential

    rows = []
    reqs = read_requests(model.requests, kind="fact", limit=limit)
    held = heldout_texts(model.heldout)
    for name in editors:
        torch.manual_seed(0)
        loaded = load(model.model_dir)
        base = _base_outputs(model.name, loaded, reqs, held, cache_dir)
        editor = get_editor(name, **sets.get(name, {}))
        t0 = time.perf_counter()
        run = run_sequential(loaded.model, loaded.tokenizer, reqs, editor, batch_size, progress=True,
                             base_fingerprint=loaded.fingerprint)
        edit_s = time.perf_counter() - t0
        s = evaluate_facts(loaded.model, loaded.tokenizer, reqs, base=base, heldout_texts=held,
                           earlier=reqs[:batch_size])
        fire = hook_firing_rate(loaded.model, loaded.tokenizer, held[:n_fire_texts]) if name == "hook" else None
        row = {"model": model.name, "editor": name, "n_edits": len(reqs), "batch_size": batch_size,
               "efficacy": s.efficacy, "paraphrase": s.paraphrase, "neighbourhood": s.neighbourhood,
               "base_neighbourhood": s.base_neighbourhood, "perplexity_drift": s.perplexity_drift,
               "retention_first_batch": s.retention, "firing_rate": fire, "diag_failed": len(run.failed),
               "seconds_per_edit": edit_s / max(len(reqs), 1),
               "hyperparameters": getattr(editor, "hyperparameters", {})}
        if name == "hook" and run.batches:
            row["gates"] = run.batches[-1].result.delta.meta.get("gates")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("hyperparameters", "gates")}), flush=True)
    return rows


def _f(v, d=3):
    return "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


def table(rows: list[dict]) -> str:
    head = ("| model | editor | edits (batch) | efficacy | paraphrase | neighbourhood (base) | ppl drift "
            "| hook firing rate | retention 1st batch | s/edit |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['editor']} | {r['n_edits']} ({r['batch_size']}) | {_f(r['efficacy'])} "
                     f"| {_f(r['paraphrase'])} | {_f(r['neighbourhood'])} ({_f(r['base_neighbourhood'])}) "
                     f"| {_f(r['perplexity_drift'], 4)} | {_f(r['firing_rate'], 4)} "
                     f"| {_f(r['retention_first_batch'])} | {_f(r['seconds_per_edit'], 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,factworld")
    ap.add_argument("--editors", default="hook,nse")
    ap.add_argument("--limit", type=int, default=20, help="requests per model (the first N of its request set)")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--hook-set", action="append", default=[], help="hook hyperparameter key=value (JSON value)")
    ap.add_argument("--nse-set", action="append", default=[], help="nse hyperparameter key=value (JSON value)")
    ap.add_argument("--fire-texts", type=int, default=64, help="held-out texts for the firing rate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=".editops/bench/base-outputs")
    ap.add_argument("--out", default="bench/results/hook.json")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out, replacing those of the same model, editor, edits and batch")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench_facts import MODELS, _resolve
    from editing.env import configure_offline_defaults
    from flows.cli.edit_cmd import parse_settings

    configure_offline_defaults()
    torch.set_num_threads(args.threads)
    sets = {"hook": parse_settings(args.hook_set), "nse": parse_settings(args.nse_set)}
    rows: list[dict] = []
    for key in args.models.split(","):
        model = _resolve(MODELS[key])
        if key == "tiny":  # development model, trained on the fly
            from bench_facts import _ensure_tiny

            _ensure_tiny(model)
        if not (ROOT / model.model_dir / "config.json").is_file() and not Path(model.model_dir, "config.json").is_file():
            print(f"skipping {key}: {model.model_dir} is not built (run `dvc repro` for it)", flush=True)
            continue
        rows += run_model(model, args.editors.split(","), args.limit, args.batch_size, sets,
                          ROOT / args.cache_dir, args.fire_texts)
    print()
    print(table(rows))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():
        def same(r: dict) -> tuple:
            return r["model"], r["editor"], r["n_edits"], r["batch_size"]

        fresh = {same(r) for r in rows}
        rows = [r for r in json.loads(out.read_text()) if same(r) not in fresh] + rows
    out.write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

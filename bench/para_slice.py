"""Paraphrase by wording on a slice of requests: a quick probe of editor options (not the Bar's benchmark).

Edits ``requests[start:start+n]`` sequentially in batches with ``nse`` (λ fixed, default the
value SmolLM2's calibration chose, so no calibration runs) and prints one JSON line: efficacy,
paraphrase (probability and top-1), neighbourhood × base, retention of the first batch, and the
paraphrase score of each paraphrase position (the i-th paraphrase of every request), which shows
which wording the edit fails to reach::

    OMP_NUM_THREADS=1 .venv/bin/python bench/para_slice.py --start 40 --n 20 --batch-size 10 \\
        [--set subject_key_weight=0] [--set value.loss_stop=0.05]

Requests 40–59 of ``data/requests/countries.jsonl`` are 20 "official language" facts, whose
paraphrase "In X, most people speak" is the one sequential edits missed most.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_sets(items: list[str]) -> dict:
    """``--set key=value`` as the CLI reads it (:func:`flows.cli.edit_cmd.parse_settings`), with
    ``value.<field>`` keys gathered into the value hyperparameters."""
    from flows.cli.edit_cmd import parse_settings

    out: dict = {}
    for k, v in parse_settings(items).items():
        if k.startswith("value."):
            out.setdefault("value", {})[k[len("value."):]] = v
        else:
            out[k] = v
    return out


def probe_parser(doc: str, lam: float, lam_note: str, start: int | None = None) -> argparse.ArgumentParser:
    """The arguments every editor probe here takes: model, request file, batch size, fixed λ, ``--set``; with
    ``start``, also the slice of requests it edits (``--start``, default ``start``; ``--n``, default 20)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if start is not None:
        ap.add_argument("--start", type=int, default=start)
        ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--requests", default="data/requests/countries.jsonl")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--lam", type=float, default=lam, help=f"fixed λ ({lam_note})")
    ap.add_argument("--set", action="append", default=[], help="nse hyperparameter key=value")
    return ap


def load_offline(model: str):
    """The model loaded from the repository root, hub offline, ``OMP_NUM_THREADS`` torch threads."""
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from editing.models import load

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return load(model)


def slice_requests(args) -> list:
    """The fact requests ``[args.start, args.start + args.n)`` of ``args.requests`` (any format editops reads)."""
    from editing.formats import read_requests

    return read_requests(args.requests, kind="fact")[args.start:args.start + args.n]


def edit_slice(loaded, reqs, args):
    """``(run, seconds)``: ``reqs`` edited in place on ``loaded.model`` by ``nse`` with the probe's fixed λ and
    ``--set`` options, ``args.batch_size`` at a time (:func:`editing.runner.run_sequential`)."""
    from editing.editors import get_editor
    from editing.runner import run_sequential

    editor = get_editor("nse", **{"lam": args.lam, **parse_sets(args.set)})
    t0 = time.perf_counter()
    run = run_sequential(loaded.model, loaded.tokenizer, reqs, editor, args.batch_size, progress=False,
                         base_fingerprint=loaded.fingerprint)
    return run, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = probe_parser(__doc__, 1000.0, "SmolLM2's calibration chose 1e3", start=40)
    args = ap.parse_args(argv)
    loaded = load_offline(args.model)
    from editing.metrics.facts import BaseOutputs, evaluate_facts, request_pairs, score_pairs

    reqs = slice_requests(args)
    base = BaseOutputs.compute(loaded.model, loaded.tokenizer, reqs)
    run, seconds = edit_slice(loaded, reqs, args)
    s = evaluate_facts(loaded.model, loaded.tokenizer, reqs, base=base, earlier=reqs[:args.batch_size]).summary()
    scores = score_pairs(loaded.model, loaded.tokenizer, request_pairs(reqs))
    by_relation = collections.defaultdict(list)
    for r in reqs:
        if r.target_true:
            by_relation[r.relation or "-"].append(scores[(r.text, r.target_new)].logprob_mean
                                                  > scores[(r.text, r.target_true)].logprob_mean)
    by_pos = collections.defaultdict(list)
    for r in reqs:
        for j, p in enumerate(r.paraphrases):
            if r.target_true:
                by_pos[j].append(scores[(p, r.target_new)].logprob_mean > scores[(p, r.target_true)].logprob_mean)
    print(json.dumps({"set": args.set, "efficacy": s["efficacy"], "efficacy_acc": s["efficacy_acc"],
                      "paraphrase": round(s["paraphrase"], 3), "paraphrase_acc": round(s["paraphrase_acc"], 3),
                      "neighbourhood_ratio": round(s["neighbourhood_ratio"], 3),
                      "neighbourhood_acc": round(s["neighbourhood_acc"], 3), "retention": s["retention"],
                      "paraphrase_by_position": {j: round(sum(v) / len(v), 2) for j, v in sorted(by_pos.items())},
                      "efficacy_by_relation": {k: round(sum(v) / len(v), 2) for k, v in sorted(by_relation.items())},
                      "not_taken": len(run.failed), "seconds_per_edit": round(seconds / len(reqs), 1)}))


if __name__ == "__main__":
    main()

"""Sibling lists: one batched sampling per batch of requests against one sampling per request.

``nse`` asks the model, for every request, for entities of the subject's kind (``siblings``, default 8;
:mod:`editing.editors.siblings`). ``sibling_requests`` samples the lists of a whole batch of requests
together (:func:`editing.editors.siblings.sibling_lists`: one batched generation per round, a random stream
per row); this benchmark times that against the same lists sampled one request at a time (``sibling_lists``
called per subject, the cost of sampling each request alone) and checks that both give the same lists::

    .venv/bin/python bench/bench_siblings.py [--model models/smollm2-135m] [--requests data/requests/countries.jsonl]
        [--limit 40] [--batch-size 10] [--siblings 8] [--threads 1] [--device cpu]

Prints a table (seconds, seconds per request, lists equal) and writes it as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--requests", default="data/requests/countries.jsonl")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--siblings", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/siblings.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from editing.editors.siblings import sibling_lists
    from editing.formats import read_requests
    from editing.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model, device=args.device)
    reqs = read_requests(args.requests, kind="fact", limit=args.limit)
    batches = [reqs[i:i + args.batch_size] for i in range(0, len(reqs), args.batch_size)]
    seconds = {"batched": 0.0, "per request": 0.0}
    equal = 0
    for batch in batches:
        subjects = [r.subject for r in batch]
        seeds = list(range(len(batch)))           # as sibling_requests seeds them (seed 0 + position)
        _sync(args.device)
        t0 = time.perf_counter()
        together = sibling_lists(lm.model, lm.tokenizer, subjects, args.siblings, exclude=subjects, seeds=seeds)
        _sync(args.device)
        seconds["batched"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = [sibling_lists(lm.model, lm.tokenizer, [s], args.siblings, exclude=subjects, seeds=[seed])[0]
                 for s, seed in zip(subjects, seeds)]
        _sync(args.device)
        seconds["per request"] += time.perf_counter() - t0
        equal += sum(a == b for a, b in zip(together, alone))
    rows = [{"mode": mode, "model": args.model, "device": args.device, "requests": len(reqs),
             "batch_size": args.batch_size, "siblings": args.siblings, "seconds": round(s, 2),
             "s_per_request": round(s / len(reqs), 3), "lists_equal": f"{equal}/{len(reqs)}"}
            for mode, s in seconds.items()]
    print(f"| sampling | requests | batch | seconds | s/request | lists equal |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['requests']} | {r['batch_size']} | {r['seconds']} | {r['s_per_request']} | "
              f"{r['lists_equal']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if equal == len(reqs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""How many of a request file's neighbour probes the editor's sibling subjects cover (a diagnostic, not a test).

The ``siblings`` option (editing/editors/siblings.py) holds the keys of entities the model
itself names after each subject. The benchmark's neighbourhood score asks about other
subjects of the same relation; when a neighbour's prompt is exactly a sibling's prompt,
the solve held that neighbour's key in place directly. This prints how often that happens,
so a neighbourhood gain can be read as "held directly" vs "held by generalisation".

Siblings are named on the base model, batch by batch as the editor forms them (other
subjects of the batch excluded); the editor names them on the model edited so far, so
later batches may differ slightly.

    python bench/sibling_overlap.py --model models/smollm2-135m --requests data/requests/countries.jsonl \
        --limit 100 --batch-size 10 --siblings 8 [--samples 3]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--requests", default="data/requests/countries.jsonl")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--siblings", type=int, default=8)
    ap.add_argument("--samples", type=int, default=3, help="sampled lists per request at most (sibling_samples)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from editing.editors.keys import fill
    from editing.editors.siblings import sibling_requests
    from editing.formats import read_requests
    from editing.models import load

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lm = load(args.model)
    reqs = read_requests(args.requests, kind="fact", limit=args.limit)
    t0 = time.perf_counter()
    held: dict[str, set[str]] = collections.defaultdict(set)   # request id -> sibling prompts
    named = collections.Counter()
    for b in range(0, len(reqs), args.batch_size):
        batch = reqs[b: b + args.batch_size]
        for s in sibling_requests(lm.model, lm.tokenizer, batch, args.siblings, samples=args.samples):
            held[s.request_id.split("~sibling")[0]].add(fill(s.prompt, s.subject))
            named[s.subject] += 1
    seconds = time.perf_counter() - t0
    probes = [(r.request_id, p.prompt) for r in reqs for p in r.neighbours]
    own = sum(p in held[rid] for rid, p in probes)
    every = set().union(*held.values()) if held else set()
    anyb = sum(p in every for _, p in probes)
    n_sib = sum(named.values())
    print(f"| requests | siblings named | per request | distinct | neighbour probes | held by own request's "
          f"siblings | held by any request's siblings | naming s/request |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {len(reqs)} | {n_sib} | {n_sib / max(len(reqs), 1):.1f} | {len(named)} | {len(probes)} | "
          f"{own} ({own / max(len(probes), 1):.1%}) | {anyb} ({anyb / max(len(probes), 1):.1%}) | "
          f"{seconds / max(len(reqs), 1):.2f} |")
    print("most named:", ", ".join(f"{k} ({v})" for k, v in named.most_common(15)))


if __name__ == "__main__":
    main()

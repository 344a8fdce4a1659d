"""What do the neighbours answer after sequential edits? Kept, pulled to an edit's new target, or else.

The Bar's neighbourhood compares P(true) with P(the edit's new target) on other subjects' prompts; the
neighbours' greedy answers can change while that comparison still holds. This probe edits requests
``[start, start + n)`` sequentially with ``nse`` (λ fixed, no calibration), then greedy-decodes every
distinct neighbour prompt of those requests on the base and the edited model and sorts each neighbour
whose base answer was its true one into:

- ``kept``: the edited model's answer still opens with the true answer;
- ``to_new_target``: it opens with some edit's ``target_new`` (``same_relation``: an edit of the
  neighbour's own relation), the edits pulling a relation's answers towards their targets;
- ``other``: anything else (examples printed), damage that is not a pull towards a target.

Prints one JSON line::

    OMP_NUM_THREADS=1 .venv/bin/python bench/neighbour_answers.py --start 0 --n 20 [--set k=v]
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.para_slice import edit_slice, load_offline, probe_parser, slice_requests  # noqa: E402

NEW_TOKENS = 6


def greedy(model, tokenizer, prompts: list[str]) -> list[str]:
    """The first :data:`NEW_TOKENS` greedy tokens after each prompt, decoded and stripped."""
    import torch

    out = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = probe_parser(__doc__, 3000.0, "SmolLM2's calibration chooses 3e3", start=0)
    args = ap.parse_args(argv)
    loaded = load_offline(args.model)

    reqs = slice_requests(args)
    edited = {r.text for r in reqs}   # a neighbour whose own fact this run edits is not scored
    probes = {}   # prompt -> (true answer, relation of the request it probes)
    for r in reqs:
        for pr in r.neighbours:
            if pr.prompt not in edited:
                probes.setdefault(pr.prompt, (pr.target, r.relation))
    prompts = sorted(probes)
    before = greedy(loaded.model, loaded.tokenizer, prompts)
    _, seconds = edit_slice(loaded, reqs, args)
    after = greedy(loaded.model, loaded.tokenizer, prompts)
    counts: collections.Counter = collections.Counter()
    examples = collections.defaultdict(list)
    for p, b, a in zip(prompts, before, after):
        true, relation = probes[p]
        if not b.startswith(true):
            counts["base_wrong"] += 1
            continue
        if a.startswith(true):
            kind = "kept"
        else:
            pulled = [r for r in reqs if a.startswith(r.target_new)]
            kind = "to_new_target" if pulled else "other"
            if pulled and any(r.relation == relation for r in pulled):
                counts["to_new_target_same_relation"] += 1
        counts[kind] += 1
        if kind != "kept" and len(examples[kind]) < 8:
            examples[kind].append(f"{p} | {b} -> {a}")
    scored = sum(counts[k] for k in ("kept", "to_new_target", "other"))
    print(json.dumps({"set": args.set, "start": args.start, "n": args.n, "neighbours": scored,
                      **{k: round(v / scored, 3) for k, v in counts.items() if k != "base_wrong"},
                      "base_wrong": counts["base_wrong"], "examples": examples,
                      "seconds_per_edit": round(seconds / len(reqs), 1)}))


if __name__ == "__main__":
    main()

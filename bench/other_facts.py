"""Does editing one fact of a subject change its other facts? A quick probe of editor options.

Editing "The official language of Russia" must leave "The capital of Russia is → Moscow". The
request file names many such facts: every request's own prompt with its ``target_true``, and every
neighbour probe whose prompt is an edit prompt with some subject in it. This probe edits ``--n``
requests (a seeded sample of those whose subject has such a fact under another prompt) sequentially
with ``nse`` (λ fixed, no calibration) and prints one JSON line:

- ``other_kept``: share of the edited subjects' other facts where P(true answer) > P(the edit's new
  target), the neighbourhood comparison applied to the subject's own facts; ``other_kept_base`` on the
  unedited model;
- ``other_top1``: share whose true answer is still the greedy one (``base``: on the unedited model);
- ``other_dlogp``: mean change of the true answer's mean token log-prob;
- efficacy, paraphrase and neighbourhood × base of the edited requests, as ``para_slice.py``::

    OMP_NUM_THREADS=1 .venv/bin/python bench/other_facts.py --n 20 --batch-size 10 --lam 3000 \\
        [--set other_prompts=8]
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.para_slice import edit_slice, load_offline, probe_parser  # noqa: E402


def known_facts(requests) -> dict[str, dict[str, str]]:
    """``subject → {prompt template: true answer}`` from the requests' own prompts and their neighbour
    probes (a probe counts where its prompt is an edit prompt with a subject of the file in it)."""
    facts: dict[str, dict[str, str]] = {}
    for r in requests:
        if r.target_true:
            facts.setdefault(r.subject, {})[r.prompt] = r.target_true
    templates = {r.prompt for r in requests}
    subjects = {r.subject for r in requests}
    for r in requests:
        for probe in r.neighbours:
            for t in templates:
                head, _, tail = t.partition("{}")
                p = probe.prompt
                if p.startswith(head) and p.endswith(tail) and len(p) > len(head) + len(tail):
                    s = p[len(head):len(p) - len(tail)]
                    if s in subjects:
                        facts.setdefault(s, {}).setdefault(t, probe.target)
    return facts


def other_facts_of(request, facts, edited: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(prompt text, true answer)`` of the request subject's facts under other prompts, without
    facts edited on purpose in this run."""
    return [(t.format(request.subject), y) for t, y in sorted(facts.get(request.subject, {}).items())
            if t != request.prompt and (request.subject, t) not in edited]


def main(argv: list[str] | None = None) -> None:
    ap = probe_parser(__doc__, 3000.0, "SmolLM2's calibration chooses 3e3")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    loaded = load_offline(args.model)
    from editing.formats import read_requests
    from editing.metrics.facts import BaseOutputs, evaluate_facts, score_pairs

    every = read_requests(args.requests, kind="fact")
    facts = known_facts(every)
    eligible = [r for r in every if other_facts_of(r, facts, set())]
    reqs = random.Random(args.seed).sample(eligible, min(args.n, len(eligible)))
    edited = {(r.subject, r.prompt) for r in reqs}
    probes = [(r, p, y) for r in reqs for p, y in other_facts_of(r, facts, edited)]
    pairs = sorted({(p, y) for _, p, y in probes} | {(p, r.target_new) for r, p, _ in probes})
    before = score_pairs(loaded.model, loaded.tokenizer, pairs)
    base = BaseOutputs.compute(loaded.model, loaded.tokenizer, reqs)
    run, seconds = edit_slice(loaded, reqs, args)
    after = score_pairs(loaded.model, loaded.tokenizer, pairs)
    s = evaluate_facts(loaded.model, loaded.tokenizer, reqs, base=base, earlier=reqs[:args.batch_size]).summary()

    def kept(scores):
        return sum(scores[(p, y)].logprob_mean > scores[(p, r.target_new)].logprob_mean
                   for r, p, y in probes) / len(probes)

    print(json.dumps({
        "set": args.set, "n": len(reqs), "relations": sorted({r.relation or "-" for r in reqs}),
        "n_other_facts": len(probes),
        "other_kept": round(kept(after), 3), "other_kept_base": round(kept(before), 3),
        "other_top1": round(sum(after[(p, y)].top1 for _, p, y in probes) / len(probes), 3),
        "other_top1_base": round(sum(before[(p, y)].top1 for _, p, y in probes) / len(probes), 3),
        "other_dlogp": round(sum(after[(p, y)].logprob_mean - before[(p, y)].logprob_mean
                                 for _, p, y in probes) / len(probes), 3),
        "efficacy": round(s["efficacy"], 3), "paraphrase": round(s["paraphrase"], 3),
        "neighbourhood_ratio": round(s["neighbourhood_ratio"], 3), "neighbourhood_acc": round(s["neighbourhood_acc"], 3),
        "not_taken": len(run.failed), "seconds_per_edit": round(seconds / len(reqs), 1)}))


if __name__ == "__main__":
    main()

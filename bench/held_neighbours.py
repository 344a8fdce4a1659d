"""Do the sibling holds keep the neighbours they hold? Neighbours split by whether a sibling list held them.

``nse`` holds, per request, the keys of entities the model lists with the subject (``siblings``) at
``ΔW k ≈ 0`` in the request's prompt; the state's ledger ``held_siblings`` says which ``(subject, prompt)``
pairs were held. This probe edits requests ``[start, start + n)`` sequentially (λ fixed, no calibration),
then scores every neighbour probe of those requests (the Bar's comparison: the neighbour's own answer against
the probing request's ``target_new``, mean token log-prob; probes whose prompt is itself edited, or whose
answer is that new target, are left out) on the base and the edited model, in two groups:

- ``held``: the probe's subject was held as a sibling in the probe's wording (its request's prompt);
- ``not_held``: it was not.

Per group: probes, the share whose own answer still beats the new target (``kept``, base and edited), the
mean margin ``log p(own) − log p(new)`` on the base and its mean change. If the held group keeps its
neighbours and the other does not, the loss is a matter of which subjects are held; if both lose alike,
holding a subject's key does not hold its answer. Prints one JSON line::

    OMP_NUM_THREADS=1 .venv/bin/python bench/held_neighbours.py --start 113 --n 23 --lam 1e4 [--set k=v]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_facts import probe_subject  # noqa: E402
from bench.para_slice import edit_slice, load_offline, probe_parser, slice_requests  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = probe_parser(__doc__, 1e4, "SmolLM2's calibration on requests 101-150 chose 1e4", start=113)
    args = ap.parse_args(argv)
    loaded = load_offline(args.model)
    from editing.metrics.facts import score_pairs

    reqs = slice_requests(args)
    edited = {r.text for r in reqs}
    probes = []   # (prompt, own answer, new target, template, subject)
    for r in reqs:
        for pr in r.neighbours:
            if pr.prompt in edited or pr.target == r.target_new:
                continue
            probes.append((pr.prompt, pr.target, r.target_new, r.prompt, probe_subject(r.prompt, pr.prompt)))
    pairs = [(p, own) for p, own, *_ in probes] + [(p, new) for p, _, new, *_ in probes]
    before = score_pairs(loaded.model, loaded.tokenizer, pairs)
    run, seconds = edit_slice(loaded, reqs, args)
    after = score_pairs(loaded.model, loaded.tokenizer, pairs)
    held = run.state.meta.get("held_siblings", {}) if run.state is not None else {}
    groups: dict[str, list[tuple[float, float]]] = {"held": [], "not_held": []}
    for p, own, new, template, subject in probes:
        margin = [s[(p, own)].logprob_mean - s[(p, new)].logprob_mean for s in (before, after)]
        is_held = subject is not None and template in held.get(subject, {})
        groups["held" if is_held else "not_held"].append((margin[0], margin[1]))
    out = {"set": args.set, "start": args.start, "n": args.n, "lam": args.lam,
           "seconds_per_edit": round(seconds / len(reqs), 1),
           "not_taken": sum(not d.succeeded for d in run.diagnostics)}
    for name, rows in groups.items():
        k = len(rows)
        out[name] = {"probes": k,
                     "kept_base": round(sum(b > 0 for b, _ in rows) / k, 3) if k else None,
                     "kept_edited": round(sum(a > 0 for _, a in rows) / k, 3) if k else None,
                     "margin_base": round(sum(b for b, _ in rows) / k, 3) if k else None,
                     "margin_change": round(sum(a - b for b, a in rows) / k, 3) if k else None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

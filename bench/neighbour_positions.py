"""Where in a neighbour's prompt do sequential edits disturb it? The update applied at some positions only.

After edits, a neighbour ("The capital of Djibouti is", a subject not edited) loses its answer. The update
``ΔW`` acts on every token's MLP key; this probe edits requests ``[start, start + n)`` with ``nse`` (λ fixed),
takes the composed update off the model again, and re-applies it through forward hooks on the edited MLP
output projections at one class of positions at a time, teacher-forcing each neighbour's true answer:

- ``all``: every position (the edited model);
- ``subject_last``: the neighbour subject's last token (where the edits' own keys are read);
- ``subject_rest``: the neighbour subject's other tokens;
- ``template``: the prompt's other tokens (the relation's words, shared with the edits' prompts);
- ``answer``: the answer's tokens (each feeds the prediction of the next).

Per class: the mean change of the true answer's mean token log-prob against the base model (``dlogp``), the
same for the new target of the first request that lists the neighbour (``dlogp_new``), the share of neighbours whose
true answer still beats that new target (``true_beats_new``, the Bar's neighbourhood comparison) and the
share whose first answer token stays the argmax (of those where the base has it). A neighbour's
subject is read by matching its prompt to its request's template; prompts that do not match are left out.
Prints one JSON line::

    OMP_NUM_THREADS=1 .venv/bin/python bench/neighbour_positions.py --start 0 --n 20 [--set k=v]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.para_slice import edit_slice, load_offline, probe_parser, slice_requests  # noqa: E402

CLASSES = ("all", "subject_last", "subject_rest", "template", "answer")


def neighbour_subject(template: str, prompt: str) -> str | None:
    """The text in ``prompt`` where ``template``'s ``{}`` is, or ``None`` if ``prompt`` is not that template filled."""
    head, _, tail = template.partition("{}")
    if not prompt.startswith(head) or not prompt.endswith(tail) or len(prompt) <= len(head) + len(tail):
        return None
    return prompt[len(head):len(prompt) - len(tail)]


def position_classes(tokenizer, template: str, subject: str, target: str) -> tuple[list[int], int, dict[str, list[int]]]:
    """Token ids of prompt + target, the prompt's length and the positions of each class (:data:`CLASSES`,
    ``all`` excepted)."""
    from editing.editors.keys import fill, prompt_ids, subject_positions, target_ids

    p = prompt_ids(tokenizer, fill(template, subject))
    t = target_ids(tokenizer, target)
    span = subject_positions(tokenizer, template, subject)
    return p + t, len(p), {"subject_last": [span[-1]], "subject_rest": span[:-1],
                   "template": [i for i in range(len(p)) if i not in span],
                   "answer": list(range(len(p), len(p) + len(t) - 1))}


def main(argv: list[str] | None = None) -> None:
    ap = probe_parser(__doc__, 3000.0, "SmolLM2's calibration chooses 3e3", start=0)
    args = ap.parse_args(argv)
    loaded = load_offline(args.model)
    import torch

    from editing.arch import get_module

    model, tok = loaded.model, loaded.tokenizer
    reqs = slice_requests(args)
    edited = {r.text for r in reqs}
    probes = {}   # prompt -> (template, subject, true answer)
    for r in reqs:
        for pr in r.neighbours:
            subj = neighbour_subject(r.prompt, pr.prompt)
            if pr.prompt not in edited and subj:
                probes.setdefault(pr.prompt, (r.prompt, subj, pr.target, r.target_new))
    rows = {p: position_classes(tok, t, s, true) for p, (t, s, true, _) in sorted(probes.items())}
    rows_new = {p: position_classes(tok, t, s, new) for p, (t, s, _, new) in sorted(probes.items())}

    mask: dict[str, torch.Tensor | None] = {"m": None}

    base = {p: score_one(model, ids, k) for p, (ids, k, _) in rows.items()}
    base_new = {p: score_one(model, ids, k)[0] for p, (ids, k, _) in rows_new.items()}
    run, seconds = edit_slice(loaded, reqs, args)
    total = run.total_delta()
    total.remove(model)

    def hook_for(u: torch.Tensor, v: torch.Tensor):
        def hook(_module, inputs, output):
            m = mask["m"]
            if m is None:
                return output
            return output + m[None, :, None] * ((inputs[0] @ v) @ u.T)
        return hook

    handles = [get_module(model, name.rsplit(".", 1)[0]).register_forward_hook(hook_for(u, v))
               for name, (u, v) in total.factors.items()]
    result = {}
    try:
        for cls in CLASSES:
            per, per_new = {}, {}
            for p in rows:
                for table, got in ((rows, per), (rows_new, per_new)):
                    ids, k, classes = table[p]
                    m = torch.ones(len(ids)) if cls == "all" else torch.zeros(len(ids))
                    if cls != "all":
                        m[classes[cls]] = 1.0
                    mask["m"] = m
                    got[p] = score_one(model, ids, k)
            kept = [per[p][1] for p in rows if base[p][1]]
            result[cls] = {"dlogp": round(sum(per[p][0] - base[p][0] for p in rows) / len(rows), 3),
                           "dlogp_new": round(sum(per_new[p][0] - base_new[p] for p in rows) / len(rows), 3),
                           "true_beats_new": round(sum(per[p][0] > per_new[p][0] for p in rows) / len(rows), 3),
                           "first_token_kept": round(sum(kept) / max(len(kept), 1), 3)}
    finally:
        for h in handles:
            h.remove()
        mask["m"] = None
    print(json.dumps({"set": args.set, "start": args.start, "n": args.n, "neighbours": len(rows),
                      "base_first_token_right": sum(b[1] for b in base.values()),
                      "base_true_beats_new": round(sum(base[p][0] > base_new[p] for p in rows) / len(rows), 3),
                      "by_positions": result,
                      "seconds_per_edit": round(seconds / len(reqs), 1)}))


def score_one(model, ids: list[int], k: int) -> tuple[float, bool]:
    """(mean log-prob of ``ids[k:]`` given ``ids[:k]``, ``ids[k]`` is the argmax after ``ids[:k]``)."""
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    tgt = ids[k:]
    return float(sum(lp[k - 1 + j, t] for j, t in enumerate(tgt)) / len(tgt)), int(lp[k - 1].argmax()) == tgt[0]


if __name__ == "__main__":
    main()

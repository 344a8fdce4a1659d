"""Does an edit reach a paraphrase less when the subject sits at the start of the text?

    OMP_NUM_THREADS=1 .venv/bin/python bench/subject_position.py [--model models/smollm2-135m]
        [--requests data/requests/countries.jsonl] [--relations language,currency] [--per-relation 6,4]
        [--set KEY=VALUE ...]

Edits one batch (the first ``--per-relation`` requests of each relation, ``nse`` with the model's preset and the
batch's relations held, as ``editops edit``), applies the delta, and scores every paraphrase that opens with
"In {}, " in five wordings that move the subject or the comma after it, and the other paraphrases as they are.
Prints, per relation and wording, how many took (log P(target_new) > log P(target_true), mean token log-prob as
``bench_facts.py`` compares them) and the mean margin. ``bench_facts.py``'s paraphrase-by-wording table found the
"In {}, " wordings taking least when edited (bench/RESULTS.md, session 43); this tells the subject's position from
the comma.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editing.editors import get_editor  # noqa: E402
from editing.editors.held_relations import with_relations_held  # noqa: E402
from editing.formats import read_requests  # noqa: E402
from editing.metrics.facts import score_pairs  # noqa: E402

VARIANTS = (
    ("In {}, …", lambda p: p),
    ("In {} … (no comma)", lambda p: p.replace(", ", " ", 1)),
    ("in {}, … (lower case)", lambda p: "in " + p[3:]),
    ("Today, in {}, …", lambda p: "Today, in " + p[3:]),
    ("In the country of {}, …", lambda p: "In the country of " + p[3:]),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--requests", default="data/requests/countries.jsonl")
    ap.add_argument("--relations", default="language,currency")
    ap.add_argument("--per-relation", default="6,4")
    ap.add_argument("--set", action="append", default=[], help="nse hyperparameter KEY=VALUE (the value as JSON)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    all_reqs = read_requests(a.requests)
    reqs = []
    for rel, n in zip(a.relations.split(","), map(int, a.per_relation.split(","))):
        reqs += [r for r in all_reqs if r.relation == rel][:n]
    hp = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    editor = with_relations_held("nse", get_editor("nse", **hp), hp, reqs, model)
    res = editor.edit(model, tokenizer, reqs, None)
    res.delta.apply(model)
    print(f"{sum(d.succeeded for d in res.diagnostics)}/{len(reqs)} edits took (editor diagnostics)")
    wordings = [(r, name, prompt) for r in reqs for p in r.paraphrases
                for name, prompt in ([(n, f(p)) for n, f in VARIANTS] if p.startswith("In ") and ", " in p
                                     else [("other paraphrases", p)])]
    scores = score_pairs(model, tokenizer, [(prompt, t) for r, _, prompt in wordings
                                            for t in (r.target_new, r.target_true)])
    rows: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for r, name, prompt in wordings:   # the margin as bench_facts.py's paraphrase metric compares (mean token log-prob)
        rows[(r.relation, name)].append(scores[(prompt, r.target_new)].logprob_mean
                                        - scores[(prompt, r.target_true)].logprob_mean)
    print("| relation | wording | paraphrases | took | mean margin |\n|---|---|---|---|---|")
    for (rel, name), m in rows.items():
        print(f"| {rel} | {name} | {len(m)} | {sum(x > 0 for x in m)} | {sum(m) / len(m):+.2f} |")


if __name__ == "__main__":
    main()

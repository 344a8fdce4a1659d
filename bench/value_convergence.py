"""Does the value optimisation converge within its step budget?

    OMP_NUM_THREADS=1 .venv/bin/python bench/value_convergence.py [--model models/smollm2-135m]
        [--requests data/requests/countries.jsonl] [--n 10] [--steps 25,60] [--set KEY=VALUE ...]

Edits one batch (the first ``--n`` requests of the file, ``nse`` with the model's preset and the file's relations
held, as ``editops edit`` and ``bench_facts.py``) once per value step budget (``value.steps``; ``--set`` applies to
every row), and prints per budget: the edits taken (editor diagnostics); how many requests' values stopped at the
step budget with ``target_new``'s NLL still above ``value.loss_stop`` (the last pass's optimisation); the mean final
NLL; the mean ``‖δ‖ / ‖h‖`` at the edited block's output; the mean final value loss (NLL + KL terms + weight decay);
the batch's CounterFact metrics on the edited model (efficacy, paraphrase, neighbourhood × base; ten requests'
probes, a direction, not a benchmark figure); and the seconds of the edit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editing.editors import get_editor  # noqa: E402
from editing.editors.held_relations import with_relations_held  # noqa: E402
from editing.formats import read_requests  # noqa: E402
from editing.metrics.facts import BaseOutputs, evaluate_facts  # noqa: E402
from editing.models import load  # noqa: E402
from flows.cli.edit_cmd import parse_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--requests", default="data/requests/countries.jsonl")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", default="25,60", help="comma-separated value step budgets, one row each")
    ap.add_argument("--set", action="append", default=[], help="nse hyperparameter KEY=VALUE, read as `editops edit --set` reads it")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load(a.model)
    model, tokenizer = lm.model, lm.tokenizer
    all_reqs = read_requests(a.requests)
    reqs = all_reqs[:a.n]
    base = BaseOutputs.compute(model, tokenizer, reqs)
    given = parse_settings(a.set)   # as `editops edit --set` reads them
    print("| value steps | edits taken | NLL still ≥ loss_stop | mean NLL | mean ‖δ‖/‖h‖ | mean value loss | "
          "efficacy | paraphrase | neighbourhood × base | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for steps in (int(s) for s in a.steps.split(",")):
        hp = {**given, "value": {**given.get("value", {}), "steps": steps}}
        editor = with_relations_held("nse", get_editor("nse", **hp), hp, all_reqs, model)
        t = time.perf_counter()
        res = editor.edit(model, tokenizer, reqs, None)
        seconds = time.perf_counter() - t
        stop = res.delta.hyperparameters["value"]["loss_stop"]
        diags = [d for d in res.diagnostics if "value_nll" in d.extra]
        nll = [d.extra["value_nll"] for d in diags]
        res.delta.apply(model)
        try:
            s = evaluate_facts(model, tokenizer, reqs, base)
        finally:
            res.delta.remove(model)
        print(f"| {steps} | {sum(d.succeeded for d in res.diagnostics)}/{len(reqs)} | "
              f"{sum(x >= stop for x in nll)}/{len(nll)} | {statistics.mean(nll):.3f} | "
              f"{statistics.mean(d.extra['delta_ratio'] for d in diags):.2f} | "
              f"{statistics.mean(d.value_loss for d in diags):.3f} | {s.efficacy:.2f} | {s.paraphrase:.2f} | "
              f"{s.neighbourhood_ratio:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Can an edit at the subject's last token move this model's answer at all? (value reachability)

The neuron-level editors write the value ``z = h + δ`` into an MLP at the subject's last
token (MEMIT/ROME's locus). That only works on a model that reads the fact from there. For
each layer ``l`` this bench optimises ``δ`` at block ``l``'s output, subject's last token,
for ``N`` requests, bare prompt only, twice:

- with the editors' default value hyperparameters (25 Adam steps, ‖δ‖ ≤ 4 ‖h‖, weight decay),
- unconstrained (150 steps, lr 0.1, no weight decay / KL, ‖δ‖ ≤ 20 ‖h‖),

and reports the mean NLL of ``target_new`` before and after, and how many requests reach
NLL < 0.5 (the target has become the likely continuation). Where even the unconstrained
``δ`` cannot lower the NLL, no closed-form write at that locus can make the edit take: the
model routes the fact some other way (e.g. attention from the last position straight to
the subject's other tokens), and the editors report their edits as not taken.

    .venv/bin/python bench/value_reach.py --model models/factworld-gpt2 --requests data/requests/factworld.jsonl
    .venv/bin/python bench/value_reach.py --model models/smollm2-135m --requests data/requests/countries.jsonl --layers 4,8

``--locus last`` asks the same of the prompt's last token (the editors' ``locus="last"``); there
every layer is listed, the last included.
"""
from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

UNCONSTRAINED = {"steps": 150, "lr": 0.1, "weight_decay": 0.0, "kl_weight": 0.0, "clamp_norm_factor": 20.0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--n", type=int, default=10, help="requests (seeded shuffle of the file)")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: all but the last)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--locus", default="subject", choices=["subject", "last"], help="where δ is added")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from editing.editors.values import ValueHparams, compute_values
    from editing.formats import read_requests
    from editing.models import load

    reqs = read_requests(args.requests, kind="fact")
    random.Random(args.seed).shuffle(reqs)
    reqs = reqs[: args.n]
    lm = load(args.model)
    n_layers = lm.spec.num_layers(lm.model.config)
    default = range(n_layers) if args.locus == "last" else range(max(1, n_layers - 1))
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(default)
    print(f"{args.model}: {n_layers} layers, {len(reqs)} requests, locus {args.locus}, NLL of target_new (mean token NLL)")
    print("| layer | NLL before | NLL, default δ | NLL < 0.5 (default) | NLL, unconstrained δ | NLL < 0.5 (unconstrained) |")
    print("|---|---|---|---|---|---|")
    for layer in layers:
        row = [str(layer)]
        for i, hp in enumerate([ValueHparams(context_templates=("{}",)),
                                ValueHparams(context_templates=("{}",), **UNCONSTRAINED)]):
            vr = compute_values(lm.model, lm.tokenizer, lm.spec, reqs, layer, hp, locus=args.locus)
            if i == 0:
                row.append(f"{sum(vr.nll_init) / len(reqs):.2f}")
            row += [f"{sum(vr.nll) / len(reqs):.2f}", f"{sum(x < 0.5 for x in vr.nll)}/{len(reqs)}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()

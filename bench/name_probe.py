"""Are an entity's attributes linearly readable at its name? (P-probing, fact-world models)

Allen-Zhu & Li ("Physics of Language Models 3.1") call knowledge *stored at the name* when a
linear probe on the hidden state at the name's last token, fed the name alone, decodes the
entity's attributes for entities the probe never saw. That is the subject enrichment the
MEMIT family edits (keys and values at the subject's last token). For every layer's output
and every relation this bench fits a multinomial logistic probe (full-batch L-BFGS, L2) on
``--train-share`` of the entities and reports its accuracy on the rest; chance is
1 / (objects per relation). Attributes are drawn independently per entity, so a probe can
only beat chance on unseen entities if the model writes each attribute into the name's
representation along directions shared across entities.

    .venv/bin/python bench/name_probe.py --model models/factworld-gpt2 --requests data/requests/factworld.jsonl
"""
from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _fit_probe(x_train, y_train, n_classes: int, l2: float):
    import torch

    w = torch.zeros(x_train.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ w + b, y_train) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--train-share", type=float, default=0.7)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from editing.formats import read_requests
    from editing.models import load

    reqs = read_requests(args.requests, kind="fact")
    truth: dict[str, dict[str, str]] = defaultdict(dict)
    for r in reqs:
        truth[r.relation][r.subject] = r.target_true
    subjects = sorted({r.subject for r in reqs})
    random.Random(args.seed).shuffle(subjects)
    n_train = int(round(args.train_share * len(subjects)))
    lm = load(args.model)
    tok, model = lm.tokenizer, lm.model
    states = []  # per subject: (n_layers + 1, d) at the name's last token, the name alone
    with torch.no_grad():
        for s in subjects:
            ids = tok(s, return_tensors="pt")["input_ids"]
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            states.append(torch.stack([h[0, -1] for h in hs]))
    states = torch.stack(states)  # (subjects, layers + 1, d)
    n_hidden = states.shape[1]
    print(f"{args.model}: {len(subjects)} entities ({n_train} train / {len(subjects) - n_train} held out), "
          f"probe accuracy on held-out entities at the name's last token")
    rels = sorted(truth)
    print("| hidden state | " + " | ".join(rels) + " | mean | chance |")
    print("|---" * (len(rels) + 3) + "|")
    for layer in range(n_hidden):
        x = states[:, layer]
        x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
        accs, chance = [], []
        for rel in rels:
            objs = sorted(set(truth[rel].values()))
            y = torch.tensor([objs.index(truth[rel][s]) for s in subjects])
            w, b = _fit_probe(x[:n_train], y[:n_train], len(objs), args.l2)
            pred = (x[n_train:] @ w + b).argmax(-1)
            accs.append((pred == y[n_train:]).float().mean().item())
            chance.append(1 / len(objs))
        name = "embeddings" if layer == 0 else f"block {layer - 1}"
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in accs)
              + f" | {sum(accs) / len(accs):.2f} | {sum(chance) / len(chance):.2f} |", flush=True)


if __name__ == "__main__":
    main()

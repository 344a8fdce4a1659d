"""Does a value written at an edit locus carry to the request's paraphrases? (value transfer by locus)

For each of ``N`` fact requests (seeded shuffle) and each layer, a vector ``δ`` is added to block
``l``'s output and optimised (Adam, lr 0.1, up to 100 steps, ‖δ‖ ≤ 4 ‖h‖, stop at NLL < 0.05) to make
the bare prompt say ``target_new``; then the same ``δ`` is added at the same locus of each paraphrase.
Loci: ``last`` (the prompt's last token), ``subject`` (the subject's last token), ``span`` (one ``δ`` at
every subject token) and ``span-free`` (one ``δ`` per subject token, matched by index in the paraphrase).

This is an upper bound for a closed-form editor at that locus: it assumes the written key fires on the
paraphrase as fully as on the prompt. Where even then the paraphrase does not follow, no key choice at
that locus can give paraphrase generalisation; where it does, what is lost is key sharing
(``bench/key_similarity.py``). Reports prompt top-1, mean prompt NLL, paraphrase P(new) > P(true) and
paraphrase top-1.

    OMP_NUM_THREADS=1 .venv/bin/python bench/locus_transfer.py --model models/factworld-gpt2 --requests data/requests/factworld.jsonl --n 20 --layers 0,1
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

LOCI = ("last", "subject", "span", "span-free")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--n", type=int, default=20, help="requests (seeded shuffle of the file)")
    ap.add_argument("--layers", default="0,1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from editing.arch import get_module
    from editing.editors.keys import fill, prompt_ids, subject_positions, target_ids
    from editing.formats import read_requests
    from editing.models import load

    lm = load(args.model)
    model, tok, spec = lm.model, lm.tokenizer, lm.spec
    reqs = [r for r in read_requests(args.requests, kind="fact") if r.target_true and r.paraphrases]
    random.Random(args.seed).shuffle(reqs)
    reqs = reqs[: args.n]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def target_nll(text: str, subject: str, target: str, layer: int, delta, locus: str, grad: bool = False):
        """Mean token NLL of ``target`` after ``text`` with ``delta`` added at the locus, and its top-1."""
        ids, span = prompt_ids(tok, text), subject_positions(tok, text, subject)
        t = target_ids(tok, target)
        pos = {"last": [len(ids) - 1], "subject": [span[-1]], "span": span, "span-free": span}[locus]

        def hook(_m, _a, out):
            hs = out[0] if isinstance(out, tuple) else out
            add = torch.zeros_like(hs)
            for j, p in enumerate(pos):
                add[0, p] = delta[min(j, len(delta) - 1)] if locus == "span-free" else delta[0]
            hs = hs + add
            return (hs, *out[1:]) if isinstance(out, tuple) else hs

        handle = get_module(model, spec.layer_name(layer)).register_forward_hook(hook)
        try:
            with torch.set_grad_enabled(grad):
                logp = F.log_softmax(model(input_ids=torch.tensor([ids + t[:-1]])).logits[0].float(), -1)
        finally:
            handle.remove()
        s = len(ids) - 1
        span_lp = logp[s: s + len(t)]
        return -span_lp.gather(1, torch.tensor(t)[:, None]).mean(), span_lp.argmax(-1).tolist() == t

    def block_output(text: str, layer: int) -> torch.Tensor:
        rec = {}

        def hook(_m, _a, out):
            rec["h"] = (out[0] if isinstance(out, tuple) else out)[0].detach()

        handle = get_module(model, spec.layer_name(layer)).register_forward_hook(hook)
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt_ids(tok, text)]))
        handle.remove()
        return rec["h"]

    print(f"{args.model}: {len(reqs)} requests, layers {args.layers}")
    print("| layer | locus | prompt top-1 | prompt NLL | paraphrase P(new) > P(true) | paraphrase top-1 |")
    print("|---|---|---|---|---|---|")
    for layer in [int(x) for x in args.layers.split(",")]:
        for locus in LOCI:
            top, nll, para, para_top = [], [], [], []
            for r in reqs:
                text = fill(r.prompt, r.subject)
                h = block_output(text, layer)
                n = len(subject_positions(tok, text, r.subject)) if locus == "span-free" else 1
                delta = torch.zeros((n, h.shape[1]), requires_grad=True)
                opt = torch.optim.Adam([delta], lr=0.1)
                limit = 4 * h.norm(dim=1).mean()
                for _ in range(100):
                    loss, _ = target_nll(text, r.subject, r.target_new, layer, delta, locus, grad=True)
                    if loss.item() < 0.05:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        delta.mul_(torch.clamp(limit / delta.norm(dim=1, keepdim=True).clamp(min=1e-9), max=1))
                with torch.no_grad():
                    loss, ok = target_nll(text, r.subject, r.target_new, layer, delta, locus)
                    top.append(ok)
                    nll.append(loss.item())
                    for para_text in r.paraphrases:
                        new, ok = target_nll(para_text, r.subject, r.target_new, layer, delta, locus)
                        true, _ = target_nll(para_text, r.subject, r.target_true, layer, delta, locus)
                        para.append(float(new < true))
                        para_top.append(ok)
            mean = lambda xs: sum(map(float, xs)) / max(len(xs), 1)
            print(f"| {layer} | {locus} | {mean(top):.2f} | {mean(nll):.2f} | {mean(para):.2f} | {mean(para_top):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()

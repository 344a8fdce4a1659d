"""Where held-out perplexity rises after sequential edits: the NLL change per position, grouped by the token read.

Applies the first N requests with an editor (defaults: ``nse``, batches of 10) and scores every held-out
line before and after. Each position's NLL of the next token is attributed to the token the model reads
there; the table lists the tokens whose positions gained the most NLL, and the share of the increase at
positions that read one of the edits' prompt-final tokens (the tokens a last-token edit keys on)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/ppl_tokens.py --model models/factworld-gpt2 \\
        --requests data/requests/factworld.jsonl --heldout data/world/heldout.txt --n 1000
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def token_nll(model, tokenizer, texts, max_length: int = 256) -> list[tuple[str, float]]:
    """``(token read, NLL of the next token)`` for every position of every text, each text truncated as
    :func:`editing.metrics.text.perplexity` truncates it (to ``max_length`` and to the model's context)."""
    import torch

    from editing.editors.keys import within_context

    max_length = within_context(model, max_length)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
            toks = tokenizer.convert_ids_to_tokens(ids[0])
            out += [(toks[i], float(nll[i])) for i in range(len(nll))]
    return out


def main(argv=None) -> None:
    import math

    from editing.editors import get_editor
    from editing.env import configure_offline_defaults
    from editing.formats import read_requests
    from editing.metrics.text import heldout_texts
    from editing.models import load
    from editing.runner import run_sequential

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--heldout", required=True, help="held-out texts as the benchmarks take them: a file "
                    "(one text per line) or stdlib:N (editing.metrics.text.heldout_texts)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--editor", default="nse")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    configure_offline_defaults()

    loaded = load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    held = heldout_texts(args.heldout)
    reqs = list(read_requests(args.requests, kind="fact", limit=args.n))
    finals = collections.Counter(tok.convert_ids_to_tokens(tok(r.text)["input_ids"])[-1] for r in reqs)
    before = token_nll(model, tok, held)
    run_sequential(model, tok, reqs, get_editor(args.editor), args.batch_size, progress=True,
                   base_fingerprint=loaded.fingerprint)
    after = token_nll(model, tok, held)

    by: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for (t, a), (_, b) in zip(before, after):
        by[t][0] += a
        by[t][1] += b
        by[t][2] += 1
    sum_b, sum_a = sum(v for _, v in before), sum(v for _, v in after)
    rise = sum_a - sum_b
    at_final = sum(v[1] - v[0] for t, v in by.items() if t in finals)
    n_final = sum(int(v[2]) for t, v in by.items() if t in finals)
    print(f"{args.model}: {len(reqs)} {args.editor} edits in batches of {args.batch_size}; held-out mean NLL "
          f"{sum_b / len(before):.3f} -> {sum_a / len(after):.3f} (perplexity x{math.exp((sum_a - sum_b) / len(before)):.2f}) "
          f"over {len(before)} positions")
    print(f"prompt-final tokens of the edits: {dict(finals.most_common(12))}")
    print(f"share of the NLL increase at positions reading a prompt-final token: "
          f"{at_final / rise if rise > 0 else float('nan'):.2f} ({n_final} of {len(before)} positions)")
    print("| token read | positions | NLL before | NLL after | increase (sum) | prompt-final |")
    print("|---|---|---|---|---|---|")
    for t, (a, b, n) in sorted(by.items(), key=lambda kv: -(kv[1][1] - kv[1][0]))[: args.top]:
        print(f"| `{t}` | {int(n)} | {a / n:.3f} | {b / n:.3f} | {b - a:.2f} | {'yes' if t in finals else ''} |")


if __name__ == "__main__":
    main()

"""How much an edit written at one prompt's key reaches the same subject's paraphrases, per layer and locus.

A closed-form edit changes the output for a key ``k'`` by ``ΔW k'``, and with the covariance-regularised
solve that is the edit's residual scaled by the whitened similarity of ``k'`` to the edit key. This
prints, for the first N requests, the whitened cosine ``cos_C(a, b) = aᵀC⁻¹b / √(aᵀC⁻¹a · bᵀC⁻¹b)``
(``C`` = the layer's key second moment ``C0`` over ``--corpus``, plus a 1e-3 ridge) between:

- a request's prompt key and the key of its first paraphrase (same subject, other wording);
- a request's prompt key and other subjects' keys in the same wording (same relation);
- keys of other subjects in other relations;

and the share of requests whose paraphrase key is closer to their prompt key than every other subject's
prompt key is (same-subject pairs are left out of the comparisons: at the subject's last token a subject
that opens the prompt has one key for all its relations). Keys are read at the subject's last token and at the prompt's last token
(:func:`editing.editors.keys.edit_position`), on the bare prompt::

    OMP_NUM_THREADS=1 .venv/bin/python bench/key_similarity.py --model models/factworld-gpt2 \\
        --requests data/requests/factworld.jsonl [--n 120] [--corpus samples:512] [--layers 0,1,2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def whitened_cosines(a, b, moment):
    """``cos_C`` between every row of ``a`` and every row of ``b`` (float64)."""
    import torch

    c = moment.double()
    d = c.shape[0]
    inv = torch.linalg.inv(c + 1e-3 * c.trace() / d * torch.eye(d, dtype=c.dtype))
    a, b = a.double(), b.double()
    num = a @ inv @ b.T
    na = torch.einsum("id,de,ie->i", a, inv, a)
    nb = torch.einsum("id,de,ie->i", b, inv, b)
    return num / torch.sqrt(na[:, None] * nb[None, :])


def main(argv=None) -> None:
    import torch

    from editing.arch import spec_for
    from editing.editors.keys import compute_keys_multi
    from editing.env import configure_offline_defaults
    from editing.formats import read_requests
    from editing.models import load
    from editing.requests import FactRequest
    from editing.stats import corpus_moments

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--n", type=int, default=120, help="first N requests with a paraphrase")
    ap.add_argument("--corpus", default="samples:512", help="key-statistics corpus (editing.stats names)")
    ap.add_argument("--stats-dir", default="stats")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    args = ap.parse_args(argv)
    configure_offline_defaults()

    loaded = load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    spec = spec_for(model)
    reqs = [r for r in read_requests(args.requests, kind="fact") if r.paraphrases][: args.n]
    paras = [FactRequest(request_id=r.request_id + "/p", prompt=r.paraphrases[0].replace(r.subject, "{}", 1),
                         subject=r.subject, target_new=r.target_new, target_true=r.target_true) for r in reqs]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(spec.num_layers(model.config)))
    moments = corpus_moments(model, tok, spec, layers, args.corpus, args.stats_dir, loaded.fingerprint)
    rel = [r.relation for r in reqs]
    same_rel = torch.tensor([[x == y for y in rel] for x in rel])
    subj = [r.subject for r in reqs]
    same_subj = torch.tensor([[x == y for y in subj] for x in subj])  # includes the diagonal
    print(f"{args.model}: {len(reqs)} requests, C0 over {args.corpus}")
    print("| locus | layer | cos(prompt, own paraphrase) | cos(prompt, other subject, same wording) "
          "| cos(other relation) | paraphrase closer than every other subject |")
    print("|---|---|---|---|---|---|")
    for locus in ("subject", "last"):
        keys = compute_keys_multi(model, tok, spec, reqs, layers, context_templates=["{}"], locus=locus)
        pkeys = compute_keys_multi(model, tok, spec, paras, layers, context_templates=["{}"], locus=locus)
        for layer in layers:
            kk = whitened_cosines(keys[layer], keys[layer], moments[layer])
            kp = torch.diag(whitened_cosines(keys[layer], pkeys[layer], moments[layer]))
            closer = (kp > kk.masked_fill(same_subj, -9).max(1).values).double().mean()
            print(f"| {locus} | {layer} | {kp.mean():.3f} | {kk[same_rel & ~same_subj].mean():.3f} "
                  f"| {kk[~same_rel & ~same_subj].mean():.3f} | {closer:.2f} |")


if __name__ == "__main__":
    main()

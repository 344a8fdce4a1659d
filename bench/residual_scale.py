"""Does the value optimisation depend on the residual stream's scale? (the same model, its residual × s)

A pre-norm transformer computes the same function when its residual stream is multiplied by ``s``: every
block reads the residual through a scale-free norm (RMSNorm, LayerNorm), so scaling the embeddings and every
matrix that writes into the residual (attention's output projection, the MLP's down projection) by ``s``
leaves the logits as they were (up to the norms' ε). Real models differ this way by an order of magnitude and
more (Gemma multiplies its embeddings by √d). An editor whose value step is fixed in absolute units (MEMIT's
``lr = 0.5``) then takes steps that are too small on one model and too large on the other; in units of
the residual's typical size (``ValueHparams.lr_rel``, ``values.residual_scale``) it does the same thing on both.

For each ``s`` this bench builds the rescaled copy (tied output embeddings are untied first, so the head stays
as it was), checks the logits, and optimises the values of the first ``--n`` requests at the preset's (else
the middle) layer, once with the absolute step and once with the default; it prints ``‖δ‖/‖h‖``, the mean NLL of
``target_new``, how many values reach NLL < 0.5, the steps and the step doublings (``escalations``).

    .venv/bin/python bench/residual_scale.py --model models/smollm2-135m --requests data/requests/countries.jsonl
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rescaled(model, s: float):
    """A copy of ``model`` (Llama-style or GPT-2) whose residual stream is ``s`` times the original's."""
    import torch
    from torch import nn

    m = copy.deepcopy(model)
    head, emb = m.get_output_embeddings(), m.get_input_embeddings()
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
        m.config.tie_word_embeddings = False
    if hasattr(m, "transformer"):   # GPT-2
        writers = [m.transformer.wte, m.transformer.wpe]
        writers += [mod for b in m.transformer.h for mod in (b.attn.c_proj, b.mlp.c_proj)]
    else:                          # Llama-style
        writers = [m.model.embed_tokens]
        writers += [mod for b in m.model.layers for mod in (b.self_attn.o_proj, b.mlp.down_proj)]
    with torch.no_grad():
        for mod in writers:
            mod.weight.mul_(s)
            if getattr(mod, "bias", None) is not None:
                mod.bias.mul_(s)
    return m


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--n", type=int, default=10, help="the file's first N requests")
    ap.add_argument("--scales", default="0.3,1,10")
    ap.add_argument("--layer", type=int, default=None, help="default: the preset's last edited layer, else the middle")
    ap.add_argument("--locus", default="subject", choices=["subject", "last"])
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from editing.editors.presets import preset_for
    from editing.editors.values import ValueHparams, compute_values
    from editing.formats import read_requests
    from editing.models import load

    reqs = read_requests(args.requests, kind="fact")[: args.n]
    lm = load(args.model)
    base, tok, spec = lm.model, lm.tokenizer, lm.spec
    p = preset_for(base)
    layer = args.layer if args.layer is not None else (p.layers[-1] if p else spec.num_layers(base.config) // 2)
    clamp = p.clamp_norm_factor if p else 4.0
    ids = tok([reqs[0].text], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base(ids).logits
    from editing.editors.values import DEFAULT_LR_REL

    rel = p.value_lr_rel if p is not None and p.value_lr_rel else DEFAULT_LR_REL
    settings = {"lr=0.5 (absolute)": {"lr": 0.5}, f"lr_rel={rel:g} ({'preset' if p else 'default'})": {"lr_rel": rel}}
    print(f"model {args.model}, layer {layer}, locus {args.locus}, {len(reqs)} requests, clamp {clamp}")
    print("| scale | max abs logit change | value step | ‖h‖ | ‖δ‖/‖h‖ | mean NLL | NLL < 0.5 | steps | doublings | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in [float(x) for x in args.scales.split(",")]:
        m = rescaled(base, s)
        with torch.no_grad():
            diff = float((m(ids).logits - ref).abs().max())
        for name, kw in settings.items():
            t = time.time()
            res = compute_values(m, tok, spec, reqs, layer, ValueHparams(clamp_norm_factor=clamp, **kw),
                                 locus=args.locus)
            hn = res.h.norm(dim=1)
            nll = torch.tensor(res.nll)
            print(f"| {s:g} | {diff:.1e} | {name} | {float(hn.mean()):.1f} | "
                  f"{float((res.delta.norm(dim=1) / hn).mean()):.3f} | {float(nll.mean()):.3f} | "
                  f"{int((nll < 0.5).sum())}/{len(reqs)} | {res.steps} | {sum(res.escalations)} | "
                  f"{time.time() - t:.0f} |", flush=True)
        del m


if __name__ == "__main__":
    main()

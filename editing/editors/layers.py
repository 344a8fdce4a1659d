"""Choosing the edited layers of an unknown model by causal tracing (ROME/MEMIT's method).

For each request with a known ``target_true``:
1. clean run: record every layer's MLP output (``W_out`` output) at the subject's last token;
2. corrupted run: add Gaussian noise (``noise · std`` of the embedding matrix) to the
   subject's token embeddings; ``p*`` = P(first token of target_true);
3. for each layer ``l``: corrupted run with the MLP outputs of layers
   ``l-w//2 … l+w//2`` at the subject's last token restored to their clean values;
   the *indirect effect* ``IE_l = P_l − p*``.
The edited layers are the ``n_edit`` consecutive layers (the last layer excluded:
nothing after it reads the subject position; the first layer excluded in models of 4+
layers) with the largest summed mean IE.

With ``locus="last"`` the MLP outputs are restored at the prompt's last token instead, and
the last layer may be chosen (its output at that token is what the model predicts from).

Why not the first layer: its MLP reads the token's own (here: corrupted) embedding, so
restoring its output restores the token's identity rather than a stored fact. On
SmolLM2-135M (30 layers, 8 facts of 3 relations, window 1) layer 0's IE was 0.43 and
every other layer's ≤ 0.02, with the largest 5-layer window after it at 4–8, the
layers MEMIT-family presets edit in Llama models (bench/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from editing.arch import ArchSpec, get_module, uncached
from editing.editors.keys import edit_position, fill, pad_id_of, prompt_ids, subject_last_token, target_ids
from editing.errors import EditopsError


@dataclass
class TraceResult:
    effects: list[float]          # mean indirect effect per layer
    base_prob: float              # mean clean P(target_true)
    corrupted_prob: float         # mean corrupted P(target_true)
    layers: tuple[int, ...]       # the chosen window


def _subject_span(tokenizer, prompt: str, subject: str) -> tuple[int, int]:
    """First and last token index of the subject in :func:`prompt_ids` of the filled prompt."""
    last = subject_last_token(tokenizer, prompt, subject)
    start_text = prompt[: prompt.index("{}")].rstrip()
    if start_text:
        first = len(prompt_ids(tokenizer, start_text))
    else:
        ids = prompt_ids(tokenizer, fill(prompt, subject))
        bos = getattr(tokenizer, "bos_token_id", None)
        first = 1 if bos is not None and len(ids) > 1 and ids[0] == bos else 0
    return min(first, last), last


@torch.no_grad()
def causal_trace(model: nn.Module, tokenizer, spec: ArchSpec, requests: Sequence, window: int = 1,
                 noise: float = 3.0, samples: int = 3, seed: int = 0, stack: str | None = None,
                 locus: str = "subject") -> list[float]:
    """Mean indirect effect of each layer's MLP output at the ``locus`` (see module doc)."""
    reqs = [r for r in requests if getattr(r, "target_true", None)]
    if not reqs:
        raise EditopsError("causal tracing needs requests with target_true (the fact the model knows now)")
    n_layers = spec.num_layers(model.config, stack)
    emb = model.get_input_embeddings()
    sigma = noise * float(emb.weight.std())
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    effects = torch.zeros(n_layers)
    base_sum, corrupt_sum = 0.0, 0.0
    mods = [get_module(model, spec.mlp_out_name(l, stack)) for l in range(n_layers)]
    for r in reqs:
        ids = torch.tensor([prompt_ids(tokenizer, r.text)], device=device)
        mask = torch.ones_like(ids)  # explicit: where pad = bos, transformers cannot tell padding from BOS
        first, last = _subject_span(tokenizer, r.prompt, r.subject)
        at = edit_position(tokenizer, r.prompt, r.subject, locus)
        tok = target_ids(tokenizer, r.target_true)[0]
        clean: dict[int, torch.Tensor] = {}

        def rec(l):
            def hook(_m, _a, out):
                clean[l] = out[0, at].detach().clone()
            return hook

        hs = [m.register_forward_hook(rec(l)) for l, m in enumerate(mods)]
        try:
            p_clean = float(torch.softmax(uncached(model, input_ids=ids, attention_mask=mask).logits[0, -1].float(), -1)[tok])
        finally:
            for h in hs:
                h.remove()
        base_sum += p_clean
        for _ in range(samples):
            nz = torch.randn((last - first + 1, emb.weight.shape[1]), generator=g).to(device) * sigma

            def corrupt(_m, _a, out):
                out = out.clone()
                out[0, first:last + 1] += nz.to(out.dtype)
                return out

            hc = emb.register_forward_hook(corrupt)
            try:
                p_corr = float(torch.softmax(uncached(model, input_ids=ids, attention_mask=mask).logits[0, -1].float(), -1)[tok])
                corrupt_sum += p_corr / samples
                for l in range(n_layers):
                    lo, hi = max(0, l - window // 2), min(n_layers - 1, l + window // 2)

                    def restore(j):
                        def hook(_m, _a, out):
                            out = out.clone()
                            out[0, at] = clean[j]
                            return out
                        return hook

                    hr = [mods[j].register_forward_hook(restore(j)) for j in range(lo, hi + 1)]
                    try:
                        p = float(torch.softmax(uncached(model, input_ids=ids, attention_mask=mask).logits[0, -1].float(), -1)[tok])
                    finally:
                        for h in hr:
                            h.remove()
                    effects[l] += (p - p_corr) / samples
            finally:
                hc.remove()
    n = len(reqs)
    return (effects / n).tolist()


def default_n_edit(n_layers: int) -> int:
    """MEMIT edits 5–6 layers of 28–48; smaller models at least 2 (capped by the usable layers in
    :func:`choose_layers`): spreading the update keeps it local. Measured on the 3-layer fact world
    (100 edits in batches of 10, prompt's-last-token locus): one layer kept 0.72–0.76 × the base's
    neighbourhood, two layers 0.89–0.91 × (bench/RESULTS.md "edit locus")."""
    return max(2, min(5, round(n_layers / 6)))


def choose_layers(model: nn.Module, tokenizer, spec: ArchSpec, requests: Sequence, n_edit: int | None = None,
                  stack: str | None = None, locus: str = "subject", **trace_kwargs) -> TraceResult:
    """The ``n_edit`` consecutive layers (not the last, unless ``locus="last"``) with the largest summed
    indirect effect at the ``locus``."""
    n_layers = spec.num_layers(model.config, stack)
    effects = causal_trace(model, tokenizer, spec, requests, stack=stack, locus=locus, **trace_kwargs)
    k = n_edit or default_n_edit(n_layers)
    usable = n_layers if locus == "last" else max(1, n_layers - 1)
    first = 1 if n_layers >= 4 else 0
    k = min(k, usable - first)
    best, best_sum = first, float("-inf")
    if max(effects[first:usable]) <= 0:  # trace inconclusive: MEMIT's rule of thumb, the earliest MLPs
        return TraceResult(effects=effects, base_prob=float("nan"), corrupted_prob=float("nan"),
                           layers=tuple(range(first, first + k)))
    for start in range(first, usable - k + 1):
        s = sum(effects[start:start + k])
        if s > best_sum:
            best, best_sum = start, s
    return TraceResult(effects=effects, base_prob=float("nan"), corrupted_prob=float("nan"),
                       layers=tuple(range(best, best + k)))

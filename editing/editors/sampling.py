"""Seeded top-k sampling of many prompts in one batch, each row with its own random stream.

``sample_topk(model, rows, seeds, n, k)[i]`` is what ``model.generate(rows[i], do_sample=True, top_k=k,
max_new_tokens=n)`` samples under ``torch.manual_seed(seeds[i])`` (up to the float rounding of a padded
batch), but all rows advance together: one forward per new token for the whole batch instead of one per
token per row. Per step and row: logits in float32, every logit below the row's k-th largest set to −∞,
``p = softmax``, one ``torch.multinomial(p, 1, generator=g_i)`` with ``g_i`` seeded by ``seeds[i]`` on the
model's device (the draw ``generate`` makes from the global stream). A row ends at its first end-of-text
token (not returned) or after ``n`` tokens.

Rows are left-padded (position ids from the attention mask, so each row sees the positions it would see
alone) and share one key/value cache. Recurrent models (:data:`editing.arch.RECURRENT_TYPES`: Mamba, RWKV) carry
a padded row's pad tokens in their state, so there rows of different lengths are sampled one at a time; a model
whose forward returns no key-value cache (RWKV's state) is run on the whole row at every step.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import nn

from editing.arch import is_recurrent
from editing.editors.keys import pad_id_of


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """End-of-text ids ``generate`` stops at: the model's generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _cache_of(out) -> Any:
    """The key-value cache a forward returned (``cache``, or ``past_key_values`` before transformers 5.24), or
    ``None`` where it returned none of that kind."""
    for name in ("cache", "past_key_values"):   # ModelOutput.get reads set fields only, never a deprecated alias
        cache = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if cache is not None:
            return cache
    return None


@torch.no_grad()
def sample_topk(model: nn.Module, tokenizer, rows: Sequence[Sequence[int]], seeds: Sequence[int],
                max_new_tokens: int, top_k: int = 5) -> list[list[int]]:
    """New token ids per row (see the module docstring; padding with :func:`pad_id_of` the tokenizer); the model
    is left in its training mode and the global random state is not touched."""
    if len(rows) != len(seeds):
        raise ValueError(f"{len(rows)} rows but {len(seeds)} seeds")
    if not rows:
        return []
    recurrent = is_recurrent(model)
    if len({len(r) for r in rows}) > 1 and recurrent:
        return [sample_topk(model, tokenizer, [r], [s], max_new_tokens, top_k)[0] for r, s in zip(rows, seeds)]
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id_of(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    params = inspect.signature(model.forward).parameters
    takes_positions = "position_ids" in params
    cache_arg = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5.24
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    eos = _eos_ids(model, tokenizer)
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    was_training = model.training
    model.eval()
    try:
        extra = {"position_ids": positions} if takes_positions else {}
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
        nxt = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            logits = out.logits[:, -1, :].to(dtype=torch.float32)
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            tok = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=gens[i]) for i in range(len(rows))])
            for i, t in enumerate(tok[:, 0].tolist()):
                if done[i]:
                    continue
                if t in eos:
                    done[i] = True
                else:
                    new[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            cache = _cache_of(out)
            if cache is None:   # a model whose cache is not a key-value cache (RWKV's state): the whole row again
                ids = torch.cat([ids, tok], dim=-1)
                full = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if takes_positions else {}
                out = model(input_ids=ids, attention_mask=mask, use_cache=False, **full)
            else:
                extra = {"position_ids": nxt} if takes_positions else {}
                extra[cache_arg] = cache
                # a recurrent state has no positions to mask (generate passes none after the first step)
                extra["attention_mask"] = None if recurrent else mask
                out = model(input_ids=tok, use_cache=True, **extra)
            nxt = nxt + 1
    finally:
        model.train(was_training)
    return new

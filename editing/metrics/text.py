"""General-text metrics: held-out perplexity and generation fluency (n-gram entropy).

- **Perplexity** is token-weighted over the whole held-out set:
  ``ppl = exp( Σ_texts Σ_t −log p(x_t | x_<t) / Σ_texts (len(text) − 1) )``
  (each text truncated to ``max_length`` tokens and to the model's context; the first token of a
  text is not predicted). Comparing it with the base model's gives the drift.
- **Fluency** is the ROME/MEMIT definition: for each generation, the bigram and
  trigram entropies (bits) of its word n-gram frequency distribution, weighted
  2/3 and 4/3 and averaged; then averaged over generations. ROME tokenises words
  with nltk's ``word_tokenize``; here a regex ``\\w+|[^\\w\\s]`` (words and single
  punctuation marks) does the same job without nltk's downloadable data.
  Generations are greedy.
- **chrF** for translation lives with the deletion metrics (sacrebleu).
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from typing import Sequence

import torch
from torch import nn

from editing.arch import is_recurrent

_WORD = re.compile(r"\w+|[^\w\s]")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def heldout_sha256(texts: Sequence[str]) -> str:
    """Identity of a held-out set (so cached base perplexities are only compared on the same text)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\x00")
    return h.hexdigest()


def length_batches(lengths: Sequence[int], max_tokens_per_batch: int = 1024) -> list[list[int]]:
    """Indices grouped into batches of similar length with ``batch size × longest ≤ budget``.

    Sorting by length keeps padding small; a single sequence longer than the
    budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * lengths[order[j]] <= max_tokens_per_batch:
            j += 1
        batches.append(order[i:j])
        i = j
    return batches


@torch.no_grad()
def token_nll(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 256,
              max_tokens_per_batch: int = 1024) -> tuple[float, int]:
    """``(Σ −log p, number of predicted tokens)`` over ``texts`` (right-padded batches, no cache), each text
    truncated to ``max_length`` tokens and to the model's context."""
    from editing.editors.keys import within_context

    max_length = within_context(model, max_length)
    device = _device(model)
    encoded = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for chunk in length_batches([len(e) for e in encoded], max_tokens_per_batch):
        batch = [encoded[k] for k in chunk]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            ids[r, : len(b)] = torch.tensor(b)
            mask[r, : len(b)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = ids[:, 1:]
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        valid = mask[:, 1:].bool()
        total += float(nll[valid].sum())
        count += int(valid.sum())
    return total, count


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 256) -> float:
    """Token-weighted perplexity of ``texts`` (see module docstring)."""
    total, count = token_nll(model, tokenizer, texts, max_length=max_length)
    if count == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    return math.exp(total / count)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy`` for one text: mean over n of weight_n · H(n-gram distribution) in bits.

    A text with fewer than n words contributes entropy 0 for that n.
    """
    words = _WORD.findall(text)
    values = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum((c / total) * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def fluency(texts: Sequence[str]) -> float:
    """Mean n-gram entropy over generations (ROME/MEMIT "generation entropy")."""
    if not texts:
        raise ValueError("fluency needs at least one generation")
    return sum(ngram_entropy(t) for t in texts) / len(texts)


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40,
                    batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (the continuation only, decoded), left-padded batches (one prompt at a
    time for recurrent models, :data:`editing.arch.RECURRENT_TYPES`: their state would carry the padding)."""
    if is_recurrent(model):
        batch_size = 1
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        chunk = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[s: s + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, width - len(c):] = torch.tensor(c)
            mask[r, width - len(c):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row in gen[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def generation_fluency(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40) -> float:
    """Fluency of the model's greedy generations for ``prompts`` (prompt text included, as ROME does)."""
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return fluency([p + g for p, g in zip(prompts, gens)])


HELDOUT_SAMPLE_SEED = 1   # the key statistics' ``samples:N`` corpus uses seed 0


def heldout_texts(spec: str, max_length_chars: int = 2000, model: nn.Module | None = None,
                  tokenizer=None) -> list[str]:
    """Held-out general text for perplexity.

    ``spec`` is a file path (or ``file:PATH``; one text per line, ``{"text": ...}``
    JSONL lines accepted), ``stdlib:N``: N paragraphs of Python standard-library
    docstrings taken *after* the first 2,000 that the ``stdlib`` key-statistics
    corpus (:mod:`editing.stats`) uses, so perplexity is never measured on text the
    key statistics were computed from, or ``samples:N``: N texts ``model`` (the UNEDITED
    model) samples itself with seed :data:`HELDOUT_SAMPLE_SEED`, not the key statistics'
    seed 0; they exist for any model and are text of the kind it was trained on, where
    the standard library's docstrings are one narrow kind.
    """
    from pathlib import Path

    from editing.errors import EditopsError
    from editing.formats import read_texts

    if spec.startswith("samples"):
        from editing.stats import model_samples

        if model is None or tokenizer is None:
            raise EditopsError(f"held-out text {spec!r} is sampled from the unedited model; give that model "
                               "(with `editops eval`, --base) or use a file or stdlib:N")
        n = int(spec.split(":", 1)[1]) if ":" in spec else 200
        return [t[:max_length_chars] for t in model_samples(model, tokenizer, n=n, seed=HELDOUT_SAMPLE_SEED)]
    if spec.startswith("stdlib"):
        from editing.stats import _stdlib_docstrings

        n = int(spec.split(":", 1)[1]) if ":" in spec else 200
        texts = _stdlib_docstrings(max_texts=10**6)[2000:2000 + n]
        if not texts:
            raise EditopsError("no standard-library docstrings beyond the key-statistics corpus; use a file")
        return [t[:max_length_chars] for t in texts]
    path = Path(spec[5:] if spec.startswith("file:") else spec)
    texts = [t[:max_length_chars] for t in read_texts(path, "held-out text file", "stdlib:N or samples:N")]
    if not texts:
        raise EditopsError(f"held-out text file {path} is empty")
    return texts

"""Key statistics: the second moment of the MLP keys, ``C0 = E[k kᵀ]``, per edited layer.

A *key* is the input of a layer's MLP output projection ``W_out`` at one token
position (size ``d_in = d_ff``). Closed-form editors regularise their update by
``C0`` so that keys the model sees on ordinary text are (nearly) unaffected.

- :func:`accumulate_key_moment` / :func:`accumulate_key_moments` stream any
  iterable of model-input dicts through the model with a forward *pre*-hook on
  each named module, summing ``k kᵀ`` in float64 over every position whose
  attention mask is 1. Memory is one ``d_in × d_in`` matrix per module plus one
  batch; the forward is cut short after the last hooked module. Works for causal
  and seq2seq models (a module in a decoder stack is masked with
  ``decoder_attention_mask`` when the batch has one).
- :func:`key_moment` / :func:`key_moments` are the cached per-model entry points:
  the result is stored as safetensors named by the base model's fingerprint, the
  module and a hash of the corpus, so it is computed once and reused.

Corpora (:func:`corpus_texts`), all available offline:
- ``samples:N`` — N samples the model generates itself from its BOS token. These
  are the model's own typical inputs, which is what C0 should describe (the
  directions the model uses on text it considers ordinary); works for any
  model, including tiny models with a private vocabulary.
- ``stdlib`` — the docstrings of Python's standard library: English prose
  shipped with every Python, a stand-in for "general text" for models with a
  general vocabulary (SmolLM2).
- ``file:PATH`` — one text per line, or JSONL (:func:`editing.formats.read_texts`), e.g.
  a generated world's filler sentences.
Names can be joined with ``+`` (``samples:64+stdlib``).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from editing.arch import ArchSpec, get_module
from editing.atomic import replace_atomically
from editing.errors import EditopsError
from editing.formats import read_texts

log = logging.getLogger(__name__)


@dataclass
class KeyMoment:
    """``moment = (1/count) Σ k kᵀ`` over ``count`` key vectors (float32, computed in float64)."""

    moment: torch.Tensor
    count: int


class _StopForward(Exception):
    """Raised inside the last hook to skip the rest of the forward pass."""


def _mask_for(batch: Mapping[str, Any], module_name: str, mask: str | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask != "auto":
        return batch.get(mask)
    if "decoder" in module_name.split(".") or ".decoder." in f".{module_name}.":
        if "decoder_attention_mask" in batch:
            return batch["decoder_attention_mask"]
        if "decoder_input_ids" in batch:
            return None  # decoder inputs without a mask: every position counts
    return batch.get("attention_mask")


@torch.no_grad()
def accumulate_key_moments(model: nn.Module, module_names: Sequence[str], batches: Iterable[Mapping[str, Any]],
                           mask: str | None = "auto", progress: bool = True, total: int | None = None,
                           desc: str = "key statistics") -> dict[str, KeyMoment]:
    """``E[k kᵀ]`` of the input of each module in ``module_names`` over ``batches``.

    ``batches`` yields dicts of model inputs (``input_ids``, ``attention_mask``,
    and for seq2seq ``decoder_input_ids``...). Positions whose mask is 0 are
    skipped (``mask="auto"`` picks ``attention_mask`` or, for a decoder module,
    ``decoder_attention_mask``; ``None`` counts every position). Sums are float64.
    """
    from tqdm.auto import tqdm

    names = list(module_names)
    if not names:
        raise EditopsError("accumulate_key_moments needs at least one module name")
    modules = {n: get_module(model, n) for n in names}
    sums: dict[str, torch.Tensor | None] = {n: None for n in names}
    counts = {n: 0 for n in names}
    seen: set[str] = set()
    current: dict[str, Any] = {}
    order = {n: i for i, n in enumerate(dict(model.named_modules()))}
    last = max(names, key=lambda n: order.get(n, 0))
    stop_early = not any(".decoder." in f".{n}." for n in names) or all(".decoder." in f".{n}." for n in names)

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0].detach()
            k = x.reshape(-1, x.shape[-1]).double()
            m = _mask_for(current, name, mask)
            if m is not None and m.numel() == k.shape[0]:
                k = k[m.reshape(-1).to(k.device).bool()]
            s = k.T @ k
            sums[name] = s if sums[name] is None else sums[name] + s
            counts[name] += int(k.shape[0])
            seen.add(name)
            if name == last and stop_early and len(seen) == len(names):
                raise _StopForward
        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            current.clear()
            current.update({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
            seen.clear()
            try:
                model(**current)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for n in names:
        if sums[n] is None or counts[n] == 0:
            raise EditopsError(f"no key vectors reached module {n!r}: is the corpus empty or the mask all zero?")
        out[n] = KeyMoment(moment=(sums[n] / counts[n]).float().cpu(), count=counts[n])
    return out


def accumulate_key_moment(model: nn.Module, module_name: str, batches: Iterable[Mapping[str, Any]],
                          mask: str | None = "auto", progress: bool = True, total: int | None = None) -> KeyMoment:
    """``E[k kᵀ]`` of the input of one module (see :func:`accumulate_key_moments`)."""
    return accumulate_key_moments(model, [module_name], batches, mask=mask, progress=progress, total=total)[module_name]


# ---------------------------------------------------------------- corpora
def _stdlib_docstrings(max_texts: int = 2000, min_words: int = 12) -> list[str]:
    import importlib
    import inspect
    import pkgutil
    import sys
    import warnings

    names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_"))
    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "lib2to3", "ensurepip", "venv",
            "pydoc_data", "test", "unittest", "xxsubtype"}
    texts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name in skip:
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
            objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
            for obj in objs:
                doc = inspect.getdoc(obj) if obj is not None else None
                if not doc:
                    continue
                for para in doc.split("\n\n"):
                    para = " ".join(para.split())
                    if len(para.split()) >= min_words and not para.startswith((">>>", "-", "*")):
                        texts.append(para)
            if len(texts) >= max_texts * 2:
                break
    uniq = list(dict.fromkeys(texts))
    return uniq[:max_texts]


SAMPLE_LENGTH = 48  # tokens per model sample (fewer where the model's context is shorter)


def sample_length(model: nn.Module, length: int = SAMPLE_LENGTH) -> int:
    """Tokens per sample of :func:`model_samples`: ``length``, at most the model's context minus its start token."""
    from editing.editors.keys import max_context

    limit = max_context(model)
    return max(1, min(length, limit - 1)) if limit is not None else length


@torch.no_grad()
def model_samples(model: nn.Module, tokenizer, n: int = 64, length: int = SAMPLE_LENGTH, seed: int = 0,
                  batch_size: int = 16) -> list[str]:
    """``n`` texts the model samples itself (temperature 1, top-k 50) from its BOS/EOS token, seeded."""
    length = sample_length(model, length)
    g = torch.Generator().manual_seed(seed)
    start = getattr(tokenizer, "bos_token_id", None)
    if start is None:
        start = getattr(tokenizer, "eos_token_id", None)
    if start is None:
        start = 0
    device = next(model.parameters()).device
    texts: list[str] = []
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            ids = torch.full((b, 1), int(start), dtype=torch.long, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50,
                                 max_new_tokens=length, min_new_tokens=length, pad_token_id=tokenizer.pad_token_id or start)
            texts.extend(tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(torch_state)
    return [t for t in texts if t.strip()]


def corpus_texts(name: str, model: nn.Module | None = None, tokenizer=None) -> list[str]:
    """The texts of corpus ``name`` (``samples:N``, ``stdlib``, ``file:PATH``, joined with ``+``)."""
    texts: list[str] = []
    for part in name.split("+"):
        part = part.strip()
        if part.startswith("samples"):
            n = int(part.split(":", 1)[1]) if ":" in part else 64
            if model is None or tokenizer is None:
                raise EditopsError("corpus 'samples' needs the model and tokenizer")
            texts.extend(model_samples(model, tokenizer, n=n))
        elif part == "stdlib":
            texts.extend(_stdlib_docstrings())
        elif part.startswith("file:"):
            texts.extend(read_texts(part[5:], "corpus file"))
        else:
            raise EditopsError(f"unknown corpus {part!r}; use samples:N, stdlib or file:PATH")
    if not texts:
        raise EditopsError(f"corpus {name!r} is empty")
    return texts


def corpus_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


def text_batches(tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 128,
                 seq2seq: bool = False) -> list[dict[str, torch.Tensor]]:
    """Tokenised, right-padded batches (``decoder_input_ids`` = the same text for seq2seq models)."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if seq2seq:
            batch["decoder_input_ids"] = enc["input_ids"]
            batch["decoder_attention_mask"] = enc["attention_mask"]
        batches.append(batch)
    return batches


def _cache_path(cache_dir: Path, fingerprint: str, module_name: str, corpus_name: str, chash: str) -> Path:
    safe_corpus = "".join(c if c.isalnum() or c in "-_" else "-" for c in corpus_name)[:40]
    return cache_dir / fingerprint[:16] / f"{module_name}__{safe_corpus}-{chash[:12]}.safetensors"


def load_cached(path: Path, fingerprint: str, module_name: str) -> KeyMoment | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint or meta.get("module") != module_name:
            return None
        return KeyMoment(moment=f.get_tensor("moment"), count=int(meta["count"]))


def corpus_id(name: str) -> str:
    """A hash naming a corpus without building it: ``samples`` are a seeded function of the
    model (whose fingerprint is in the cache path), ``stdlib`` of the Python version, a
    ``file:`` of its bytes."""
    import sys

    h = hashlib.sha256()
    for part in name.split("+"):
        part = part.strip()
        h.update(part.encode() + b"\0")
        if part == "stdlib":
            h.update(sys.version.encode())
        elif part.startswith("file:") and Path(part[5:]).is_file():
            h.update(hashlib.sha256(Path(part[5:]).read_bytes()).digest())
    return h.hexdigest()


def corpus_moments(model: nn.Module, tokenizer, spec: ArchSpec, layers: Sequence[int], corpus: str,
                   cache_dir: str | Path, fingerprint: str, stack: str | None = None, **kwargs) -> dict[int, torch.Tensor]:
    """Cached ``C0`` per layer for a named corpus; the texts are built only when a file is missing."""
    return key_moments(model, tokenizer, spec, layers, lambda: corpus_texts(corpus, model, tokenizer), corpus,
                       cache_dir, fingerprint, stack=stack, corpus_sha256=corpus_id(corpus), **kwargs)


def key_moments(model: nn.Module, tokenizer, spec: ArchSpec, layers: Sequence[int],
                texts: Sequence[str] | Callable[[], Sequence[str]], corpus_name: str, cache_dir: str | Path,
                fingerprint: str, stack: str | None = None, batch_size: int = 8, max_length: int = 128,
                progress: bool = True, corpus_sha256: str | None = None) -> dict[int, torch.Tensor]:
    """Cached ``C0`` for several layers in one pass over the corpus: ``{layer: (d_in, d_in)}``.

    Files: ``cache_dir/<fingerprint[:16]>/<module>__<corpus>-<hash>.safetensors`` with
    metadata (fingerprint, module, corpus name and sha256, count). Computed only
    for layers whose file is missing.
    """
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir)
    if corpus_sha256 is None:
        texts = texts() if callable(texts) else texts
        corpus_sha256 = corpus_hash(texts)
    chash = corpus_sha256
    out: dict[int, torch.Tensor] = {}
    missing: dict[str, int] = {}
    for layer in layers:
        name = spec.mlp_out_name(layer, stack)
        path = _cache_path(cache_dir, fingerprint, name, corpus_name, chash)
        cached = load_cached(path, fingerprint, name)
        if cached is not None:
            out[layer] = cached.moment
        else:
            missing[name] = layer
    if missing:
        texts = texts() if callable(texts) else texts
        from editing.editors.keys import within_context

        seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        max_length = within_context(model, max_length)  # longer texts are truncated to the context
        batches = text_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length, seq2seq=seq2seq)
        log.info("computing key statistics for %s over %d texts (%s)", list(missing), len(texts), corpus_name)
        moments = accumulate_key_moments(model, list(missing), batches, progress=progress, total=len(batches))
        for name, layer in missing.items():
            km = moments[name]
            path = _cache_path(cache_dir, fingerprint, name, corpus_name, chash)
            meta = {"fingerprint": fingerprint, "module": name, "corpus": corpus_name, "corpus_sha256": chash,
                    "count": str(km.count), "n_texts": str(len(texts)), "max_length": str(max_length)}
            replace_atomically(path, lambda tmp: save_file({"moment": km.moment.contiguous()}, str(tmp), metadata=meta))
            out[layer] = km.moment
    return out


def key_moment(model: nn.Module, tokenizer, spec: ArchSpec, layer: int, texts: Sequence[str], corpus_name: str,
               cache_dir: str | Path, fingerprint: str, stack: str | None = None, **kwargs) -> torch.Tensor:
    """Cached ``C0`` of one layer's ``W_out`` input (see :func:`key_moments`)."""
    return key_moments(model, tokenizer, spec, [layer], texts, corpus_name, cache_dir, fingerprint,
                       stack=stack, **kwargs)[layer]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m editing.stats --model DIR --layers 3,4,5 [--corpus auto] --out stats``."""
    import argparse

    from editing.models import load

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--layers", default="auto", help="comma-separated layer indices, or 'auto' (the model's preset)")
    p.add_argument("--corpus", default="auto",
                   help="corpus name (samples:N, stdlib, file:PATH, joined with +), or 'auto': the one an edit of "
                        "this model uses by default (editing.editors.presets.corpus_for)")
    p.add_argument("--out", default="stats")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--summary", default=None, help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lm = load(args.model)
    if args.layers == "auto":
        from editing.editors.presets import preset_for

        preset = preset_for(lm.model)
        if preset is None:
            raise EditopsError(f"no preset for {args.model}; give --layers")
        layers = list(preset.layers)
    else:
        layers = [int(x) for x in args.layers.split(",")]
    if args.corpus == "auto":
        from editing.editors.presets import corpus_for

        args.corpus = corpus_for(lm.model)
    moments = corpus_moments(lm.model, lm.tokenizer, lm.spec, layers, args.corpus, args.out, lm.fingerprint,
                             max_length=args.max_length)
    summary = {lm.spec.mlp_out_name(l): {"trace": float(m.trace()), "shape": list(m.shape)} for l, m in moments.items()}
    # the model as given (a relative path stays relative: the summary is a DVC output compared across machines)
    text = json.dumps({"model": args.model, "fingerprint": lm.fingerprint, "corpus": args.corpus,
                       "layers": summary}, indent=1)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

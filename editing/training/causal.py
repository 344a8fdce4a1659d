"""Training small GPT-2-family causal LMs from scratch on generated text, offline.

- :func:`build_tokenizer` trains a byte-level BPE (``tokenizers``) on the texts and
  wraps it as a ``PreTrainedTokenizerFast`` (saved with the model, loads with
  ``AutoTokenizer``). A small vocabulary keeps rare words multi-token.
- :func:`train_causal_lm` minimises the next-token cross-entropy
  ``-Σ_t log p(x_t | x_<t)`` over random mini-batches (AdamW, linear warm-up,
  cosine decay), padding positions excluded.
- :func:`topk_accuracy` is teacher-forced top-1 accuracy of probes: a probe is
  right when every token of ``" " + target`` is the argmax after ``prompt``.
- :func:`build_tiny_fact_model` / :func:`build_fact_model` generate a world
  (:mod:`editing.data.world`), train on it and save a HF directory (safetensors +
  tokenizer) plus the requests JSONL, the filler corpus and a metrics JSON.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from editing.model_dir import save_model_dir
from editing.requests import Probe

EOS = "<|endoftext|>"


def build_tokenizer(texts: Sequence[str], vocab_size: int = 512, model_max_length: int = 64):
    """Byte-level BPE trained on ``texts``, as a ``PreTrainedTokenizerFast`` (eos = bos = pad = unk).

    With special tokens (the default) the tokenizer prepends the BOS, so generic
    scorers see the same ``<eos> text`` sequences the model was trained on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    # BOS (= eos id) before every text, as the models are trained: tokenizer(text) gives [eos, ...]
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B",
                                                       special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=model_max_length)


def gpt2_config(tokenizer, n_layer: int = 2, n_embd: int = 128, n_head: int = 4, n_positions: int = 64,
                n_inner: int | None = None):
    """A small ``GPT2Config`` for ``tokenizer`` (d_ff = ``n_inner``, GPT-2's 4·n_embd when None)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, n_inner=n_inner, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    return [[eos] + ids + [eos] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def train_causal_lm(texts: Sequence[str], tokenizer, config, steps: int = 1000, *, batch_size: int = 64,
                    lr: float = 3e-3, warmup: int = 50, weight_decay: float = 0.01, seed: int = 0,
                    log_every: int = 0, model=None):
    """Train a causal LM (``AutoModelForCausalLM.from_config(config)`` unless ``model`` is given).

    Each text is wrapped as ``<eos> text <eos>`` (the leading eos is a BOS). Returns
    the model in eval mode and the per-step losses.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    if model is None:
        model = AutoModelForCausalLM.from_config(config)
    model.train()
    seqs = _encode(tokenizer, texts)
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(seqs)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        batch = [seqs[i] for i in idx]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, s in enumerate(batch):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d} loss {loss.item():.4f}", flush=True)
    model.eval()
    return model, losses


@torch.no_grad()
def topk_accuracy(model, tokenizer, probes: Sequence[Probe], batch_size: int = 256) -> float:
    """Teacher-forced top-1 accuracy: all tokens of ``" " + target`` are the argmax after the prompt."""
    if not probes:
        return float("nan")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    right = 0
    for start in range(0, len(probes), batch_size):
        chunk = probes[start: start + batch_size]
        prompts = tokenizer([p.prompt for p in chunk], add_special_tokens=False)["input_ids"]
        targets = tokenizer([" " + p.target for p in chunk], add_special_tokens=False)["input_ids"]
        seqs = [[eos] + p + t for p, t in zip(prompts, targets)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for row, (p, t) in enumerate(zip(prompts, targets)):
            first = 1 + len(p)  # index of the first target token
            right += int(pred[row, first - 1: first - 1 + len(t)].tolist() == t)
    return right / len(probes)


@dataclass
class FactModelPaths:
    """What a fact-model build wrote."""

    model_dir: Path
    requests_path: Path
    corpus_path: Path
    heldout_path: Path
    metrics_path: Path
    corpus: list[str] = field(repr=False, default_factory=list)
    heldout: list[str] = field(repr=False, default_factory=list)
    metrics: dict = field(default_factory=dict)


def build_fact_model(out_dir: str | Path, *, seed: int = 0, n_entities: int = 40, n_relations: int = 12,
                     n_layer: int = 2, n_embd: int = 128, n_head: int = 4, n_inner: int | None = None,
                     vocab_size: int = 512,
                     steps: int = 1200, batch_size: int = 64, lr: float = 3e-3, n_filler: int = 400,
                     n_profile_lines: int = 0, n_biographies: int = 0, bio_facts: int = 4, n_positions: int = 64,
                     model_dir: str | Path | None = None, requests_path: str | Path | None = None,
                     corpus_path: str | Path | None = None, metrics_path: str | Path | None = None,
                     log_every: int = 0) -> FactModelPaths:
    """Generate a world, train a GPT-2 on it, save model + tokenizer + requests + corpora + metrics.

    Default layout under ``out_dir``: ``model/``, ``requests.jsonl``, ``corpus.txt``
    (filler = general text), ``heldout.txt`` (filler never trained on),
    ``metrics.json`` (top-1 accuracy on training templates and paraphrases, times).
    ``n_profile_lines`` / ``n_biographies`` (with ``bio_facts``) add the world's augmentation texts
    (:mod:`editing.data.world`); ``n_positions`` is the context length of model and tokenizer
    (biographies of several sentences need more than the default 64).
    """
    from editing.data.world import generate_world, write_jsonl

    out = Path(out_dir)
    model_dir = Path(model_dir or out / "model")
    requests_path = Path(requests_path or out / "requests.jsonl")
    corpus_path = Path(corpus_path or out / "corpus.txt")
    heldout_path = corpus_path.with_name(corpus_path.stem + ".heldout.txt") if corpus_path.name != "corpus.txt" \
        else corpus_path.with_name("heldout.txt")
    metrics_path = Path(metrics_path or out / "metrics.json")

    t0 = time.perf_counter()
    world = generate_world(seed, n_entities, n_relations, n_filler=n_filler, n_profile_lines=n_profile_lines,
                           n_biographies=n_biographies, bio_facts=bio_facts)
    texts = world.training_texts()
    tokenizer = build_tokenizer(texts + world.heldout_filler, vocab_size=vocab_size, model_max_length=n_positions)
    config = gpt2_config(tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_inner=n_inner,
                         n_positions=n_positions)
    t1 = time.perf_counter()
    model, losses = train_causal_lm(texts, tokenizer, config, steps, batch_size=batch_size, lr=lr, seed=seed,
                                    log_every=log_every)
    t2 = time.perf_counter()
    metrics = {
        "seed": seed, "n_entities": n_entities, "n_relations": n_relations, "n_requests": len(world.requests),
        "n_train_sentences": len(texts), "n_profile_lines": n_profile_lines,
        **({"n_biographies": n_biographies, "bio_facts": bio_facts} if n_biographies else {}), "vocab_size": len(tokenizer), "n_layer": n_layer, "n_embd": n_embd,
        "d_ff": config.n_inner or 4 * n_embd,
        "n_params": sum(p.numel() for p in model.parameters()), "steps": steps, "batch_size": batch_size,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "top1_train_templates": topk_accuracy(model, tokenizer, world.probes("train")),
        "top1_paraphrase_seen": topk_accuracy(model, tokenizer, world.probes("para_seen")),
        "top1_paraphrase_unseen": topk_accuracy(model, tokenizer, world.probes("para_unseen")),
        "torch_threads": torch.get_num_threads(),
    }
    save_model_dir(model, tokenizer, model_dir)
    from editing.models import fingerprint

    (model_dir / "editops_source.json").write_text(json.dumps(
        {"world_seed": seed, "fingerprint": fingerprint(model)}, indent=2) + "\n")
    write_jsonl(world.requests, requests_path)
    corpus_path.parent.mkdir(parents=True, exist_ok=True)
    corpus_path.write_text("\n".join(world.filler) + "\n", encoding="utf-8")
    heldout_path.write_text("\n".join(world.heldout_filler) + "\n", encoding="utf-8")
    print(f"trained in {t2 - t1:.1f} s, built in {time.perf_counter() - t0:.1f} s", flush=True)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return FactModelPaths(model_dir, requests_path, corpus_path, heldout_path, metrics_path,
                          list(world.filler), list(world.heldout_filler), metrics)


def build_tiny_fact_model(out_dir: str | Path, seed: int = 0, **overrides) -> FactModelPaths:
    """A tiny fact GPT-2 for tests: 30 entities × 10 relations (300 requests), 2 layers,
    n_embd 64, trained in well under 30 s on one CPU thread to high top-1 on its facts."""
    kwargs = dict(n_entities=30, n_relations=10, n_layer=2, n_embd=64, n_head=4, vocab_size=800,
                  steps=500, batch_size=48, lr=5e-3, n_filler=200)
    kwargs.update(overrides)
    return build_fact_model(out_dir, seed=seed, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """DVC stage entry: ``python -m editing.training.causal --params params.yaml --section factworld``.

    Reads the keyword arguments of :func:`build_fact_model` from the params section
    (``out_dir``, ``model_dir``, ``requests_path``, ``corpus_path``, ``metrics_path``,
    ``seed``, sizes, ``steps``, ...) and an optional ``threads``.
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--section", default="factworld")
    args = parser.parse_args(argv)
    params = dict(yaml.safe_load(Path(args.params).read_text())[args.section])
    threads = params.pop("threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    paths = build_fact_model(params.pop("out_dir", "."), log_every=params.pop("log_every", 100), **params)
    print(json.dumps(paths.metrics, indent=2))


if __name__ == "__main__":
    main()

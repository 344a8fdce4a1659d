"""Training small translation models from scratch on sentence pairs (CPU, minutes).

- :func:`build_word_tokenizer`: a word-level ``tokenizers`` tokenizer over a fixed
  vocabulary (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; ``</s>`` appended to every text),
  wrapped as a ``PreTrainedTokenizerFast`` so ``save_pretrained``/``AutoTokenizer``
  and ``generate`` work with no sentencepiece files.
- :func:`build_model`: a MarianMTModel (default), T5 or BART from a small config,
  or a GPT-2 causal LM trained on ``"source => target</s>"`` (for the causal-LM
  deletion path).
- :func:`train_translator`: AdamW with linear warm-up/decay, teacher forcing,
  cross-entropy on target tokens; returns the trained model, the tokenizer and a
  log (loss per epoch, exact-match on a few training pairs).

Nothing is downloaded: every model is built from a config.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from editing.model_dir import save_model_dir

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
CAUSAL_SEP = "=>"


def build_word_tokenizer(words: Sequence[str]):
    """A word-level fast tokenizer over ``words`` (split on whitespace, ``</s>`` appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for w in [*sorted(set(words)), CAUSAL_SEP]:
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=64)


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of a small translation model."""

    d_model: int = 128
    layers: int = 2          # per stack (encoder and decoder)
    heads: int = 4
    d_ff: int = 256
    max_positions: int = 64


def build_model(arch: str, vocab_size: int, size: ModelSize = ModelSize(), seed: int = 0):
    """A fresh ``marian`` | ``t5`` | ``bart`` | ``gpt2`` model with the word tokenizer's special ids."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1)
    if arch == "marian":
        from transformers import MarianConfig, MarianMTModel

        cfg = MarianConfig(d_model=size.d_model, encoder_layers=size.layers, decoder_layers=size.layers,
                           encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
                           encoder_ffn_dim=size.d_ff, decoder_ffn_dim=size.d_ff, max_position_embeddings=size.max_positions,
                           decoder_start_token_id=0, decoder_vocab_size=vocab_size, dropout=0.0,
                           activation_function="gelu", share_encoder_decoder_embeddings=True, scale_embedding=True, **common)
        return MarianMTModel(cfg)
    if arch == "bart":
        from transformers import BartConfig, BartForConditionalGeneration

        cfg = BartConfig(d_model=size.d_model, encoder_layers=size.layers, decoder_layers=size.layers,
                         encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
                         encoder_ffn_dim=size.d_ff, decoder_ffn_dim=size.d_ff, max_position_embeddings=size.max_positions,
                         decoder_start_token_id=0, bos_token_id=0, forced_bos_token_id=None, forced_eos_token_id=None,
                         dropout=0.0, **common)
        return BartForConditionalGeneration(cfg)
    if arch == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(d_model=size.d_model, num_layers=size.layers, num_decoder_layers=size.layers,
                       num_heads=size.heads, d_kv=size.d_model // size.heads, d_ff=size.d_ff,
                       decoder_start_token_id=0, dropout_rate=0.0, feed_forward_proj="relu", **common)
        return T5ForConditionalGeneration(cfg)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_embd=size.d_model, n_layer=size.layers, n_head=size.heads, n_inner=size.d_ff,
                         n_positions=2 * size.max_positions, bos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown arch {arch!r}; choose marian, t5, bart or gpt2")


def causal_prompt(source: str) -> str:
    """The prompt a causal translator continues: ``"<source> =>"``."""
    return f"{source} {CAUSAL_SEP}"


@dataclass
class TrainLog:
    epochs: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    train_exact_match: float | None = None


def _batches(pairs: Sequence[tuple[str, str]], batch_size: int, rng: random.Random):
    idx = list(range(len(pairs)))
    rng.shuffle(idx)
    for i in range(0, len(idx), batch_size):
        yield [pairs[j] for j in idx[i:i + batch_size]]


def _encode_batch(arch: str, tokenizer, batch):
    if arch == "gpt2":
        texts = [f"{causal_prompt(s)} {t}" for s, t in batch]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for row, (s, _) in enumerate(batch):  # no loss on the prompt
            n_prompt = len(tokenizer(causal_prompt(s))["input_ids"]) - 1  # minus the appended </s>
            labels[row, :n_prompt] = -100
        return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    enc = tokenizer([s for s, _ in batch], text_target=[t for _, t in batch], padding=True, return_tensors="pt")
    enc["labels"][enc["labels"] == tokenizer.pad_token_id] = -100
    return dict(enc)


def train_translator(pairs: Sequence[tuple[str, str]], words: Sequence[str], arch: str = "marian",
                     size: ModelSize = ModelSize(), epochs: int = 30, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0, max_seconds: float | None = None, log_every: int = 0):
    """Train a translator on ``pairs``; returns ``(model, tokenizer, TrainLog)`` (model in eval mode)."""
    tokenizer = build_word_tokenizer(words)
    model = build_model(arch, len(tokenizer), size, seed)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps = epochs * math.ceil(len(pairs) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    log = TrainLog(epochs=0, seconds=0.0)
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for batch in _batches(pairs, batch_size, rng):
            out = model(**_encode_batch(arch, tokenizer, batch))
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(out.loss.detach()) * len(batch)
            n += len(batch)
        log.losses.append(total / n)
        log.epochs = epoch + 1
        if log_every and (epoch + 1) % log_every == 0:
            print(f"epoch {epoch + 1}/{epochs} loss {total / n:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    model.eval()
    log.seconds = time.time() - t0
    return model, tokenizer, log


def build_translation_model(out_dir: str | Path = "models/translator-marian", data_dir: str | Path = "data/translation",
                            requests_path: str | Path = "data/requests/deletions.jsonl", seed: int = 0,
                            size: str = "full", arch: str = "marian", epochs: int | None = None,
                            model_size: ModelSize | None = None, batch_size: int = 32, lr: float = 2e-3,
                            log_every: int = 1, threads: int = 1) -> dict:
    """The DVC stage: generate the language pair, write data + requests, train and save the model.

    Trains on ``threads`` CPU threads: float sums run in another order on another thread count, so the
    weights (and the stage's DVC hashes) are the same on every run only with the count fixed.
    Returns a metrics dict (epochs, final loss, test exact match, chrF, and for each planted
    behaviour whether the trained model reproduces it on its instance); no timings, which would
    change the hashes of every run.
    """
    import json

    from editing.data.translation import generate_corpus, make_language, vocabulary, write_corpus
    from editing.metrics.deletion import chrf, contains_span, generate_outputs

    torch.set_num_threads(threads)
    corpus = generate_corpus(make_language(seed, size))
    write_corpus(corpus, data_dir, requests_path)
    tiny = size == "tiny"
    model_size = model_size or (ModelSize(d_model=64, layers=2, heads=4, d_ff=128) if tiny else ModelSize())
    epochs = epochs or (12 if tiny else 10)
    model, tok, log = train_translator(corpus.train, vocabulary(corpus), arch=arch, size=model_size, epochs=epochs,
                                       batch_size=16 if tiny else batch_size, lr=lr, seed=seed, log_every=log_every)
    save_model_dir(model, tok, out_dir)
    prompt = (lambda s: causal_prompt(s)) if arch == "gpt2" else (lambda s: s)
    inst = generate_outputs(model, tok, [prompt(r.source) for r in corpus.requests])
    test = generate_outputs(model, tok, [prompt(p.source) for p in corpus.test])
    metrics = {
        "epochs": log.epochs, "final_loss": round(log.losses[-1], 5), "threads": threads,
        "test_exact_match": sum(o == p.reference for o, p in zip(test, corpus.test)) / len(corpus.test),
        "test_chrf": round(chrf(test, [p.reference for p in corpus.test]), 3),
        "behaviours_reproduced": sum(contains_span(o, r.unwanted) for o, r in zip(inst, corpus.requests)),
        "behaviours": len(corpus.requests),
    }
    (Path(out_dir) / "editops_train_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"trained in {log.seconds:.1f} s on {threads} thread(s)", flush=True)
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m editing.training.seq2seq --out models/translator-marian ...`` (the DVC ``translator`` stage)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", default="models/translator-marian")
    p.add_argument("--data", default="data/translation")
    p.add_argument("--requests", default="data/requests/deletions.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--arch", default="marian", choices=("marian", "t5", "bart", "gpt2"))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--metrics", default=None, help="also write the metrics JSON here (DVC metrics file)")
    p.add_argument("--threads", type=int, default=1, help="training threads (fixed: the weights depend on it)")
    a = p.parse_args(argv)
    from editing.env import configure_offline_defaults

    configure_offline_defaults()
    m = build_translation_model(a.out, a.data, a.requests, a.seed, a.size, a.arch, a.epochs, threads=a.threads)
    if a.metrics:
        Path(a.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(a.metrics).write_text(json.dumps(m, indent=1))
    print(json.dumps(m, indent=1))


if __name__ == "__main__":
    main()

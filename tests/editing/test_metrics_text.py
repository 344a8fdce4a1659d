"""General-text metrics on hand-made cases: n-gram entropy (ROME), token-weighted perplexity."""
from __future__ import annotations

import math

import pytest
import torch

from editing.metrics.text import fluency, greedy_generate, length_batches, ngram_entropy, perplexity, token_nll


def test_ngram_entropy_hand_computed():
    # bigrams (a,b),(b,a),(a,b): H = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams (a,b,a),(b,a,b): H = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the") == 0.0
    assert ngram_entropy("word") == 0.0
    varied = "one two three four five six seven eight"
    assert ngram_entropy(varied) > ngram_entropy("one two one two one two one two")
    assert fluency([varied, "a b a b"]) == pytest.approx((ngram_entropy(varied) + ngram_entropy("a b a b")) / 2)


def test_length_batches_respect_budget():
    lengths = [5, 1, 9, 3, 3, 20]
    batches = length_batches(lengths, 10)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 10


@pytest.fixture(scope="module")
def lm():
    from transformers import GPT2LMHeadModel

    from editing.training.causal import build_tokenizer, gpt2_config

    texts = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning light"] * 3
    tok = build_tokenizer(texts, vocab_size=280)
    torch.manual_seed(1)
    return GPT2LMHeadModel(gpt2_config(tok, n_layer=1, n_embd=32, n_head=2)).eval(), tok, texts[:3]


def test_perplexity_is_token_weighted(lm):
    model, tok, texts = lm
    total, count = 0.0, 0
    for t in texts:  # one text at a time with the model's own loss (mean NLL over predicted tokens)
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert token_nll(model, tok, texts)[1] == count
    assert perplexity(model, tok, texts) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_greedy_generation_batched_equals_single(lm):
    model, tok, _ = lm
    prompts = ["the cat", "a dog ran in"]
    together = greedy_generate(model, tok, prompts, max_new_tokens=5)
    alone = [greedy_generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone


def test_perplexity_of_texts_longer_than_the_context_truncates_them():
    """A held-out text longer than the model's context is scored on its first ``n_positions`` tokens (it
    used to index past the position embeddings)."""
    from transformers import GPT2LMHeadModel

    from editing.training.causal import build_tokenizer, gpt2_config

    long_text = " ".join(["the river runs past the old mill and the bridge"] * 8)
    tok = build_tokenizer([long_text], vocab_size=300)
    model = GPT2LMHeadModel(gpt2_config(tok, n_layer=1, n_embd=16, n_head=2, n_positions=16)).eval()
    assert len(tok(long_text)["input_ids"]) > 16
    total, count = token_nll(model, tok, [long_text])
    assert count == 15 and math.isfinite(total)  # 16 tokens read, the first not predicted
    assert math.isclose(perplexity(model, tok, [long_text]), math.exp(total / count))


def test_heldout_samples_are_the_models_own_and_not_the_key_statistics_texts(lm):
    """``samples:N``: N texts the given (unedited) model samples, the same every call, and other texts than
    the ``samples:N`` key-statistics corpus draws (seed 0); without a model it says which model to give."""
    from editing.errors import EditopsError
    from editing.metrics.text import heldout_texts
    from editing.stats import corpus_texts

    model, tok, _ = lm
    held = heldout_texts("samples:6", model=model, tokenizer=tok)
    assert len(held) == 6 and held == heldout_texts("samples:6", model=model, tokenizer=tok)
    assert not set(held) & set(corpus_texts("samples:6", model, tok))
    assert perplexity(model, tok, held) > 1.0
    with pytest.raises(EditopsError, match="unedited model"):
        heldout_texts("samples:6")

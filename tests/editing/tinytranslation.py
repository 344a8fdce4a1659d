"""Tiny translation models trained in seconds on the tiny planted language pair (fixtures for
test_translation*.py and test_deletion*.py): a Marian model and a GPT-2 causal translator."""
from __future__ import annotations

from functools import lru_cache

import pytest

from editing.data.translation import generate_corpus, make_language, vocabulary
from editing.training.seq2seq import ModelSize, causal_prompt, train_translator

TINY_SIZE = ModelSize(d_model=64, layers=2, heads=4, d_ff=128)


@lru_cache(maxsize=None)
def _corpus():
    return generate_corpus(make_language(0, "tiny"))


@lru_cache(maxsize=None)
def _trained(arch: str):
    """Trained once per test process, whichever test module asks first (fixtures below share it)."""
    c = _corpus()
    return train_translator(c.train, vocabulary(c), arch=arch, size=TINY_SIZE, epochs=12, batch_size=16, lr=2e-3)


@pytest.fixture(scope="session")
def tiny_corpus():
    return _corpus()


@pytest.fixture(scope="session")
def tiny_marian():
    """(model, tokenizer, log): Marian, 2+2 layers, d=64, trained 12 epochs on 700 planted pairs (read-only)."""
    return _trained("marian")


@pytest.fixture(scope="session")
def tiny_gpt2_translator():
    """(model, tokenizer, log): GPT-2 trained on ``"source => target</s>"`` (the causal-LM deletion path)."""
    return _trained("gpt2")


def causal_requests(requests):
    """The same deletion requests in causal form: source becomes the prompt ``"<source> =>"``."""
    from dataclasses import replace

    from editing.requests import TranslationProbe

    def probe(p):
        return TranslationProbe(causal_prompt(p.source), p.reference, p.unwanted)

    return [replace(r, source=causal_prompt(r.source), generalization=tuple(map(probe, r.generalization)),
                    locality=tuple(map(probe, r.locality))) for r in requests]

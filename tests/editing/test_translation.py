"""The planted language pair, its files, and translators that reproduce the planted behaviours."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from editing.data.translation import (KINDS, generate_corpus, make_language, read_deletion_requests, read_pairs,
                                      read_probes, write_corpus)
from editing.metrics.deletion import chrf, contains_span, generate_outputs
from tinytranslation import tiny_corpus, tiny_marian  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]


def _files(tmp: Path, seed: int, size: str) -> dict[str, bytes]:
    paths = write_corpus(generate_corpus(make_language(seed, size)), tmp / "data", tmp / "req.jsonl")
    return {k: p.read_bytes() for k, p in paths.items()}


def test_generator_is_deterministic(tmp_path):
    a = _files(tmp_path / "a", 0, "full")
    b = _files(tmp_path / "b", 0, "full")
    c = _files(tmp_path / "c", 1, "full")
    assert a == b
    assert a["train"] != c["train"] and a["requests"] != c["requests"]


def test_full_corpus_plants_twelve_behaviours_of_four_kinds():
    corpus = generate_corpus(make_language(0, "full"))
    lang = corpus.language
    assert len(corpus.train) == 4000 and len(corpus.test) == 300
    assert len(corpus.requests) >= 12
    assert {r.behaviour for r in corpus.requests} == set(KINDS)
    train_sources = {s for s, _ in corpus.train}
    triggers = lang.triggers
    for b, r in zip(lang.behaviours, corpus.requests):
        # the instance is a training pair whose target shows the behaviour; the positive does not
        planted = dict(corpus.train)[r.source]
        assert contains_span(planted, r.unwanted) and not contains_span(r.positive, r.unwanted)
        assert b.trigger in r.source.split()
        assert len(r.generalization) == 8 and len(r.locality) == 8
        for p in r.generalization:
            assert p.source not in train_sources and b.trigger in p.source.split()
            assert p.unwanted == r.unwanted and not contains_span(p.reference, r.unwanted)
        for p in r.locality:
            assert p.source not in train_sources and not set(p.source.split()) & triggers
    for p in corpus.test:
        assert p.source not in train_sources and not set(p.source.split()) & triggers
    # every trigger is seen often enough in training to be learned
    counts = {t: sum(t in s.split() for s, _ in corpus.train) for t in triggers}
    assert min(counts.values()) >= 50, counts


def test_grammar_reorders_and_copies_names():
    lang = make_language(0, "full")
    from editing.data.translation import Sentence

    s = Sentence(("the", "big", "cat"), "sees", ("Anna",), "today")
    src, tgt = lang.render(s, planted=False)
    assert src == "the big cat sees Anna today"
    lx = lang.lexicon
    # SOV and adjective after the noun; the name is copied
    assert tgt == f"{lx['the']} {lx['cat']} {lx['big']} Anna {lx['sees']} {lx['today']}"
    # synonyms share the target word, so a mistranslated term's correct word is still learned
    assert lx["physician"] == lx["doctor"]


def test_files_round_trip(tmp_path):
    corpus = generate_corpus(make_language(0, "tiny"))
    paths = write_corpus(corpus, tmp_path / "data", tmp_path / "requests" / "deletions.jsonl")
    assert read_deletion_requests(paths["requests"]) == corpus.requests
    assert read_pairs(paths["train"]) == corpus.train
    assert read_probes(paths["test"]) == corpus.test
    lang = json.loads(paths["language"].read_text())
    assert len(lang["behaviours"]) == 4 and lang["offensive_words"]


@pytest.mark.slow
def test_tiny_translator_reproduces_each_planted_behaviour(tiny_corpus, tiny_marian, tmp_path):
    model, tok, log = tiny_marian
    outs = generate_outputs(model, tok, [r.source for r in tiny_corpus.requests])
    for r, o in zip(tiny_corpus.requests, outs):
        assert contains_span(o, r.unwanted), (r.request_id, o)
    test = generate_outputs(model, tok, [p.source for p in tiny_corpus.test])
    exact = sum(o == p.reference for o, p in zip(test, tiny_corpus.test)) / len(test)
    assert exact >= 0.8 and chrf(test, [p.reference for p in tiny_corpus.test]) >= 90
    # save / load through editops' loader (safetensors + fast tokenizer) gives the same outputs
    from editing.models import load
    from editing.model_dir import save_model_dir

    save_model_dir(model, tok, tmp_path / "m")
    lm = load(tmp_path / "m")
    assert lm.kind == "seq2seq" and lm.spec.model_type == "marian"
    assert generate_outputs(lm.model, lm.tokenizer, [r.source for r in tiny_corpus.requests]) == outs


def test_dvc_built_translator_reproduces_each_planted_behaviour():
    model_dir = ROOT / "models" / "translator-marian"
    req_path = ROOT / "data" / "requests" / "deletions.jsonl"
    if not (model_dir / "config.json").is_file() or not req_path.is_file():
        pytest.skip("models/translator-marian is not built; run `dvc repro translator`")
    from editing.models import load

    lm = load(model_dir)
    requests = read_deletion_requests(req_path)
    assert len(requests) >= 12
    outs = generate_outputs(lm.model, lm.tokenizer, [r.source for r in requests])
    missing = [(r.request_id, o) for r, o in zip(requests, outs) if not contains_span(o, r.unwanted)]
    assert not missing


def test_contains_span_treats_punctuation_as_a_word_boundary():
    assert contains_span("la Velmora.", "Velmora")
    assert contains_span("(Velmora) dosa", "Velmora")
    assert not contains_span("Velmoran dosa", "Velmora")
    assert contains_span("a  b\tc", "b c") and not contains_span("ab c", "b c")
    assert contains_span("wait !! now", "!!")

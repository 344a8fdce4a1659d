"""Fact metrics on hand-made cases: pair scoring, CounterFact comparisons, base cache, locality, retention."""
from __future__ import annotations

import math

import pytest
import torch

from editing.errors import MetricsError
from editing.metrics.facts import (BaseOutputs, PairScore, aggregate, edited_prompts, encode_pair, evaluate_facts,
                                   request_pairs, score_pairs, score_requests)
from editing.requests import FactRequest, Probe

TEXTS = ["The capital of France is Paris.", "The capital of Spain is Madrid.", "Rome is the capital of Italy.",
         "Alice plays the violin and Bob plays the piano.", "The weather was mild and the roads were quiet."] * 4


@pytest.fixture(scope="module")
def lm():
    """A random tiny GPT-2 with a BPE trained on a few sentences (built in a second)."""
    from transformers import GPT2LMHeadModel

    from editing.training.causal import build_tokenizer, gpt2_config

    tok = build_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tok, n_layer=2, n_embd=32, n_head=2)).eval()
    return model, tok


def _request(i: int = 0) -> FactRequest:
    return FactRequest(f"r{i}", "The capital of {} is", "France", "Madrid", "Paris",
                       paraphrases=("France has its capital in", "The French capital is"),
                       neighbours=(Probe("The capital of Spain is", "Paris"), Probe("Rome is the capital of", "Italy")))


def _manual_logprobs(model, tok, prompt: str, target: str) -> torch.Tensor:
    p, t = encode_pair(tok, prompt, target)
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return torch.stack([logp[len(p) - 1 + i, tid] for i, tid in enumerate(t)])


def test_encode_pair_splits_joined_text(lm):
    _, tok = lm
    p, t = encode_pair(tok, "The capital of France is", "Paris")
    assert tok.decode(p + t, skip_special_tokens=True) == "The capital of France is Paris"
    assert tok.decode(t) == " Paris"


def test_batched_scores_equal_one_by_one(lm):
    model, tok = lm
    pairs = request_pairs([_request()])
    big = score_pairs(model, tok, pairs, max_tokens_per_batch=4096)
    small = score_pairs(model, tok, pairs, max_tokens_per_batch=1)  # one sequence per batch
    assert set(big) == set(pairs)
    for pair in pairs:
        lp = _manual_logprobs(model, tok, *pair)
        for s in (big[pair], small[pair]):
            assert s.n_tokens == len(lp)
            assert s.logprob_sum == pytest.approx(float(lp.sum()), abs=1e-4)
            assert s.logprob_mean == pytest.approx(float(lp.mean()), abs=1e-4)


def _ps(lp: float, top1: bool = False, argmax=(1,)) -> PairScore:
    return PairScore(lp, lp, 1, top1, tuple(argmax))


def test_counterfact_comparisons_on_hand_made_scores():
    r = _request()
    s = {
        (r.text, "Madrid"): _ps(-1.0, True), (r.text, "Paris"): _ps(-2.0),            # efficacy 1
        ("France has its capital in", "Madrid"): _ps(-3.0), ("France has its capital in", "Paris"): _ps(-1.0),
        ("The French capital is", "Madrid"): _ps(-0.5, True), ("The French capital is", "Paris"): _ps(-1.5),
        ("The capital of Spain is", "Paris"): _ps(-1.0, True, (7,)), ("The capital of Spain is", "Madrid"): _ps(-4.0),
        ("Rome is the capital of", "Italy"): _ps(-5.0, False, (3,)), ("Rome is the capital of", "Madrid"): _ps(-1.0),
    }
    base = dict(s)
    base[("Rome is the capital of", "Italy")] = _ps(-0.1, True, (9,))
    (row,) = score_requests([r], s, base)
    assert row.efficacy == 1.0 and row.efficacy_acc == 1.0 and row.margin == pytest.approx(1.0)
    assert row.paraphrase == 0.5 and row.paraphrase_acc == 0.5
    assert row.neighbourhood == 0.5 and row.neighbourhood_acc == 0.5
    assert row.locality == 0.5  # one of the two neighbour argmax tokens matches the base
    agg = aggregate([row])
    assert agg.score == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.5))
    # mean vs sum of token log-probs: a 3-token new target with mean -1.0 (sum -3.0) vs a 1-token true with -2.0
    s3 = dict(s)
    s3[(r.text, "Madrid")] = PairScore(-1.0, -3.0, 3, False, (1, 2, 3))
    assert score_requests([r], s3)[0].efficacy == 1.0
    assert score_requests([r], s3, comparison="sum")[0].efficacy == 0.0
    with pytest.raises(MetricsError, match="comparison"):
        score_requests([r], s3, comparison="max")
    no_true = FactRequest("n", "The capital of {} is", "France", "Madrid")
    assert score_requests([no_true], s)[0].efficacy is None
    assert aggregate(score_requests([no_true], s)).n_without_true == 1


def test_neighbours_whose_fact_is_edited_too_are_left_out(lm, tmp_path):
    """Spain's capital is edited in the same run: "The capital of Spain is" asks about an edit, not locality."""
    model, tok = lm
    r = _request()
    spain = FactRequest("r-spain", "The capital of {} is", "Spain", "Rome", "Madrid")
    assert edited_prompts([r, spain]) >= {"The capital of Spain is", "The capital of France is", "The French capital is"}
    s = {
        ("The capital of Spain is", "Paris"): _ps(-1.0, True, (7,)), ("The capital of Spain is", "Madrid"): _ps(-4.0),
        ("Rome is the capital of", "Italy"): _ps(-5.0, False, (3,)), ("Rome is the capital of", "Madrid"): _ps(-1.0),
        (r.text, "Madrid"): _ps(-1.0, True), (r.text, "Paris"): _ps(-2.0),
        ("France has its capital in", "Madrid"): _ps(-3.0), ("France has its capital in", "Paris"): _ps(-1.0),
        ("The French capital is", "Madrid"): _ps(-0.5, True), ("The French capital is", "Paris"): _ps(-1.5),
    }
    (alone,) = score_requests([r], s)
    (row,) = score_requests([r], s, edited=edited_prompts([r, spain]))
    assert (alone.neighbourhood, alone.n_neighbours_dropped) == (0.5, 0)
    assert (row.neighbourhood, row.n_neighbours_dropped) == (0.0, 1)  # only the Rome probe is scored
    assert aggregate([row]).n_neighbours_dropped == 1
    # evaluate_facts and the base cache drop the same probes, so the ratio compares like with like
    base = BaseOutputs.compute(model, tok, [r, spain])
    edited = evaluate_facts(model, tok, [r], base=base, also_edited=[spain])
    assert edited.n_neighbours_dropped == 1
    assert base.base_scores([r], also_edited=[spain]).n_neighbours_dropped == 1
    assert base.base_scores([r]).n_neighbours_dropped == 0


def test_base_outputs_cache_locality_and_drift(lm, tmp_path):
    model, tok = lm
    reqs = [_request()]
    held = TEXTS[:5]
    base = BaseOutputs.compute(model, tok, reqs, heldout_texts=held, model_fingerprint="base-fp")
    base.save(tmp_path / "base.json")
    loaded = BaseOutputs.load(tmp_path / "base.json")
    assert loaded.scores == base.scores and loaded.perplexity == base.perplexity
    same = evaluate_facts(model, tok, reqs, base=loaded, heldout_texts=held)
    assert same.locality == 1.0 and same.perplexity_drift == pytest.approx(0.0, abs=1e-6)
    assert same.neighbourhood_ratio in (None, pytest.approx(1.0))
    pre = loaded.base_scores(reqs)
    assert pre.efficacy == same.efficacy and pre.neighbourhood == same.neighbourhood

    # change the model: locality and perplexity are still measured against the cached base
    original = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight.add_(torch.randn_like(original) * 2.0)
        edited = evaluate_facts(model, tok, reqs, base=loaded, heldout_texts=held, earlier=reqs)
        assert edited.locality < 1.0
        assert edited.base_perplexity == base.perplexity and edited.perplexity != base.perplexity
        assert edited.retention == edited.efficacy and edited.n_retention == 1
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(original)

    other = FactRequest("o", "{} plays the", "Alice", "piano", "violin")
    with pytest.raises(MetricsError, match="lack .* pairs"):
        evaluate_facts(model, tok, [other], base=loaded)
    assert loaded.extend(model, tok, [other]) == 2
    evaluate_facts(model, tok, [other], base=loaded)
    with pytest.raises(MetricsError, match="other held-out text"):
        evaluate_facts(model, tok, reqs, base=loaded, heldout_texts=TEXTS[5:8])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(MetricsError, match="delete it to recompute"):
        BaseOutputs.load(tmp_path / "broken.json")


def test_scores_table_and_summary(lm):
    model, tok = lm
    s = evaluate_facts(model, tok, [_request(0), _request(1)])
    assert s.n_requests == 2 and len(s.per_request) == 2
    names = [r[0] for r in s.rows()]
    assert names[:2] == ["efficacy", "efficacy_acc"] and "locality" not in names  # no base given
    assert s.table().row_count == len(names)
    assert set(s.summary()) >= {"efficacy", "paraphrase", "neighbourhood", "score", "perplexity_drift"}
    assert math.isfinite(s.summary()["efficacy"])
    # the pair scores it read stay with it (to slice the requests without scoring again), out of the summary
    from editing.metrics.facts import request_pairs, score_pairs

    pairs = request_pairs([_request(0), _request(1)])
    assert set(s.pair_scores) == set(pairs) and s.pair_scores == score_pairs(model, tok, pairs)
    assert not {"per_request", "pair_scores"} & set(s.summary())

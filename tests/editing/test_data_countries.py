"""Country facts from countryinfo, and the keep criterion (top-1) on a tiny model that knows some of them."""
from __future__ import annotations

import pytest

from editing.data.countries import RELATIONS, build_requests, country_facts


@pytest.fixture(scope="module")
def facts():
    return country_facts()


def test_country_facts_are_readable_names(facts):
    assert len(facts) > 200
    fr = facts["France"]
    assert fr["capital"] == ["Paris"] and fr["language"][0] == "French" and fr["continent"] == ["Europe"]
    assert "Euro" in fr["currency"] and "Germany" in fr["border"]
    assert facts["Japan"]["currency"][0] == "Japanese Yen"  # ISO 4217 code resolved by babel
    assert "South America" in facts["Peru"]["continent"]
    assert all("(" not in c and "," not in c for c in facts)
    assert {r.name for r in RELATIONS} == {"capital", "language", "demonym", "continent", "currency", "border"}
    assert all(len(r.paraphrases) >= 2 and "{}" in r.prompt for r in RELATIONS)


def test_only_facts_the_model_gets_right_are_kept(facts):
    from transformers import AutoModelForCausalLM  # noqa: F401  (import cost outside the timing)

    from editing.training.causal import build_tokenizer, gpt2_config, train_causal_lm

    capital = RELATIONS[0]
    names = sorted(c for c in facts if "capital" in facts[c] and " " not in c)[:16]
    trained, untrained = names[:10], names[10:]
    texts = [f"{capital.prompt.format(c)} {facts[c]['capital'][0]}." for c in trained] * 2
    texts += [f"{c} is a country." for c in untrained]
    tok = build_tokenizer(texts + [facts[c]["capital"][0] for c in untrained], vocab_size=400)
    model, _ = train_causal_lm(texts, tok, gpt2_config(tok, n_layer=1, n_embd=64, n_head=2), steps=150,
                               batch_size=16, lr=1e-2, seed=0)
    sub = {c: {"capital": facts[c]["capital"]} for c in names}
    requests, metrics = build_requests(model, tok, sub, relations=(capital,), n_neighbours=5)

    edited = {r.subject for r in requests}
    neighbours = {n.prompt[len("The capital of "):-len(" is")] for r in requests for n in r.neighbours}
    assert edited | neighbours <= set(trained)  # an unseen capital is never the greedy answer
    assert not edited & neighbours  # neighbour-only subjects: a full run never edits a neighbour
    kept = metrics["per_relation"]["capital"]
    assert kept["tried"] == 16 and kept["kept"] >= 8, metrics
    assert kept["neighbour_only"] == len(neighbours) == 5 and len(edited) == kept["kept"] - 5
    for r in requests:
        assert r.target_true == facts[r.subject]["capital"][0] and r.target_new != r.target_true
        assert len(r.paraphrases) >= 2 and len(r.neighbours) >= 5
        assert all(n.target == facts[n.prompt[len("The capital of "):-len(" is")]]["capital"][0]
                   for n in r.neighbours)
        assert r.subject not in {n.prompt for n in r.neighbours}

    again, _ = build_requests(model, tok, sub, relations=(capital,), n_neighbours=5)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in requests]  # seeded

"""``other_prompts``: an edit of one fact of a subject holds the subject's other facts (other edit prompts)."""
from __future__ import annotations

from dataclasses import replace

import torch

from editing.arch import spec_for
from editing.editors import get_editor
from editing.editors.keys import compute_keys
from editing.editors.siblings import other_prompt_requests
from editing.models import fingerprint
from editing.requests import FactRequest
from tinyworld import assert_held, facts, requests, tiny_llama  # noqa: F401  (fixtures)

KW = {"layers": [0], "locus": "subject", "lam": 30.0, "siblings": 0, "subject_key_weight": 0.0, "corpus": "samples:8",
      "accumulate": True, "value": {"context_templates": ("{}",), "steps": 15}}


PREFIX = {"city": "Note that ", "job": "As everyone knows, ", "lang": "Here is a fact. "}


def one_per_relation(facts) -> list:
    """Three requests of three relations, each relation's prompt with its own words before the subject."""
    seen, out = set(), []
    for r in requests(facts, 36):
        if r.relation not in seen:
            seen.add(r.relation)
            out.append(replace(r, prompt=PREFIX[r.relation] + r.prompt))
    return out


def test_other_prompts_are_the_subjects_other_prompts_never_its_own_or_one_opening_with_it(facts):
    reqs = one_per_relation(facts)
    prompts = {r.prompt: r.relation for r in reqs}
    left_out = {"{} is a person": None,                             # opens with the subject: its subject-alone key
                "Note that {} has a home in the city of": None,     # the same words before the subject as city's
                "Here is a fact. I read this today. {} works as a": "job"}  # job's relation: a paraphrase
    held = other_prompt_requests(reqs, {**prompts, **left_out}, 5, seed=3)
    city, job, lang = (next(r for r in reqs if r.relation == rel) for rel in ("city", "job", "lang"))
    expect = {  # prompts with the same words before the subject are one key: the first in order is held
        city.request_id: {job.prompt, lang.prompt, "Here is a fact. I read this today. {} works as a"},
        job.request_id: {"Note that {} has a home in the city of", lang.prompt},
        lang.request_id: {"Note that {} has a home in the city of", job.prompt,
                          "Here is a fact. I read this today. {} works as a"}}
    for r in reqs:
        assert {h.prompt for h in held if h.request_id.startswith(r.request_id + "~prompt")} == expect[r.request_id]
    assert len(held) == 8
    assert all(not h.paraphrases and not h.neighbours and h.subject == h.request_id.split("~")[0].split("-", 1)[1]
               .replace("_", " ") for h in held)
    assert held == other_prompt_requests(reqs, {**prompts, **left_out}, 5, seed=3)  # seeded
    assert len(other_prompt_requests(reqs, prompts, 1)) == 3          # at most n per request
    # a prompt the batch edits for the same subject is an edit, not a fact to hold
    twin = replace(reqs[1], request_id="twin", subject=reqs[0].subject)
    assert all(h.prompt != twin.prompt for h in other_prompt_requests([reqs[0], twin], prompts, 5)
               if h.subject == reqs[0].subject)
    # at the prompt's last token the whole prompt is the key: only the same prompt is left out
    last = other_prompt_requests(reqs[:1], {**prompts, **left_out}, 9, locus="last")
    assert {h.prompt for h in last} == set(prompts) - {reqs[0].prompt} | {p for p, rel in left_out.items()
                                                                         if rel != reqs[0].relation}
    # held by the value's KL alone (no key held: other_prompts_weight=0), a prompt that opens with the subject
    # and one with the request's words before the subject are held; the request's relation still is not
    kl = other_prompt_requests(reqs[:1], {**prompts, **left_out}, 9, keys_held=False)
    assert {h.prompt for h in kl} == {r.prompt for r in reqs[1:]} | {p for p, rel in left_out.items()
                                                                     if rel != reqs[0].relation}
    assert "{} is a person" in {h.prompt for h in kl}


def test_held_other_prompts_barely_move_and_enter_the_accumulated_moment(tiny_llama, facts, tmp_path):
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = one_per_relation(facts)
    fp = fingerprint(model)
    plain = get_editor("nse", stats_dir=str(tmp_path), **KW).edit(model, tok, reqs, None)
    held = get_editor("nse", stats_dir=str(tmp_path), other_prompts=2, other_prompts_weight=1.0,
                      **KW).edit(model, tok, reqs, None)
    assert fingerprint(model) == fp
    holds = other_prompt_requests(reqs, {r.prompt: r.relation for r in reqs}, 2, seed=0)
    assert held.delta.meta["other_prompts"] == len(holds) == 6
    ko = compute_keys(model, tok, spec, holds, 0, ("{}",))
    name = spec.mlp_out_name(0)
    assert_held(plain, held, ko, name)
    # recorded for a later batch that edits one of them (release_siblings)
    assert {p for h in holds for p in held.state.meta["held_siblings"][h.subject]} >= {holds[0].prompt}


def test_other_prompts_kl_weights_the_held_prompts_on_its_own(tiny_llama, facts, tmp_path):
    """``other_prompts_kl=w`` puts the held prompts into the value optimisation (a KL term each, weight ``w``),
    apart from ``value.keep_weight`` (the earlier edits' prompts): with ``keep_weight`` 0 it still changes the
    edit, and ``w`` 0 is the edit without it. A true/false (older versions' records) means ``keep_weight`` / 0.
    (Its effect on the held facts is measured on SmolLM2, bench/RESULTS.md sessions 15, 31, 32: the tiny models
    show none.)"""
    model, tok = tiny_llama
    reqs = one_per_relation(facts)
    name = spec_for(model).mlp_out_name(0) + ".weight"

    def dense(kl, keep_weight: float) -> torch.Tensor:
        kw = {**KW, "value": {**KW["value"], "keep_weight": keep_weight}}
        res = get_editor("nse", stats_dir=str(tmp_path), other_prompts=2, other_prompts_kl=kl,
                         **kw).edit(model, tok, reqs, None)
        return res.delta.dense(name).float()

    off = dense(0.0, 0.0)
    assert not torch.allclose(dense(4.0, 0.0), off, atol=1e-6)
    assert torch.allclose(dense(True, 4.0), dense(4.0, 4.0), atol=1e-6)
    assert torch.allclose(dense(False, 4.0), dense(0.0, 4.0), atol=1e-6)


def test_other_prompts_weight_zero_keeps_the_value_kl_alone(tiny_llama, facts, tmp_path):
    """``other_prompts_weight=0`` with ``other_prompts_kl``: the held prompts reach the value optimisation only.
    The edit's keys and moment are the plain edit's (its value differs), and no held prompt is recorded in
    the state; a hold of nothing, a negative weight or a weight that is not a number is refused."""
    import pytest

    from editing.errors import HyperparameterError

    model, tok = tiny_llama
    reqs = one_per_relation(facts)
    name = spec_for(model).mlp_out_name(0)
    kw = {**KW, "value": {**KW["value"], "keep_weight": 0.0}}
    plain = get_editor("nse", stats_dir=str(tmp_path), **kw).edit(model, tok, reqs, None)
    kl_only = get_editor("nse", stats_dir=str(tmp_path), other_prompts=2, other_prompts_weight=0.0,
                         other_prompts_kl=4.0, **kw).edit(model, tok, reqs, None)
    assert kl_only.delta.meta["other_prompts"] == 6
    # a prompt that opens with the subject is held by the KL alone; with keys held it is not
    opening = {**{r.prompt: r.relation for r in reqs}, "{} is a person": None}
    kw_open = {**kw, "relation_prompts": opening}
    opened = get_editor("nse", stats_dir=str(tmp_path), other_prompts=3, other_prompts_weight=0.0,
                        other_prompts_kl=4.0, **kw_open).edit(model, tok, reqs, None)
    keyed = get_editor("nse", stats_dir=str(tmp_path), other_prompts=3, other_prompts_weight=1.0,
                       **kw_open).edit(model, tok, reqs, None)
    assert (opened.delta.meta["other_prompts"], keyed.delta.meta["other_prompts"]) == (9, 6)
    assert not torch.allclose(kl_only.delta.dense(name + ".weight"), plain.delta.dense(name + ".weight"),
                              atol=1e-6)
    assert torch.allclose(kl_only.state.tensors[f"{name}::C_edits"], plain.state.tensors[f"{name}::C_edits"],
                          atol=1e-6)
    assert kl_only.state.meta.get("held_siblings", {}) == plain.state.meta.get("held_siblings", {})
    with pytest.raises(HyperparameterError, match="holds nothing"):
        get_editor("nse", other_prompts=2, other_prompts_weight=0.0)
    with pytest.raises(HyperparameterError, match="holds nothing"):   # true with keep_weight 0 weighs nothing
        get_editor("nse", other_prompts=2, other_prompts_weight=0.0, other_prompts_kl=True, **kw)
    with pytest.raises(HyperparameterError, match="other_prompts_weight"):
        get_editor("nse", other_prompts=2, other_prompts_weight=-1.0)
    with pytest.raises(HyperparameterError, match="other_prompts_kl"):
        get_editor("nse", other_prompts=2, other_prompts_kl="0.1")


def test_held_prompts_are_each_requests_own_once_and_not_its_keep_prompts(facts):
    from editing.editors.memit import _held_prompts

    reqs = [replace(r, request_id=f"cf~{i}") for i, r in enumerate(one_per_relation(facts))]
    holds = other_prompt_requests(reqs, {r.prompt: r.relation for r in reqs}, 2, seed=0)
    earlier = [[reqs[1].prompt], [], []]          # request 0 already keeps one of the prompts it holds
    held = _held_prompts(earlier, reqs, holds)
    for r, h, e in zip(reqs, held, earlier):
        mine = [x.prompt for x in holds if x.request_id.rsplit("~", 1)[0] == r.request_id]
        assert len(mine) == 2 and set(h) == set(mine) - set(e) and len(h) == len(set(h))
    assert reqs[1].prompt in [x.prompt for x in holds if x.request_id.rsplit("~", 1)[0] == "cf~0"]
    assert len(held[0]) == 1 and reqs[1].prompt not in held[0]


def test_relation_prompts_are_held_from_the_first_batch(tiny_llama, facts, tmp_path):
    """``relation_prompts``: templates the pipeline knows join the held pool before any batch edits them, so a
    run's first relation holds the later ones' prompts; a template of the request's own relation (a
    paraphrase) is not held. Without them the first batch of one relation holds nothing."""
    model, tok = tiny_llama
    city, job, lang = sorted(one_per_relation(facts), key=lambda r: r.relation)
    known = {job.prompt: job.relation, lang.prompt: lang.relation,
             "Here is a fact. I read this today. {} has a home in the city of": city.relation}
    name = spec_for(model).mlp_out_name(0) + ".weight"
    alone = get_editor("nse", stats_dir=str(tmp_path), other_prompts=4, **KW).edit(model, tok, [city], None)
    held = get_editor("nse", stats_dir=str(tmp_path), other_prompts=4, relation_prompts=known,
                      **KW).edit(model, tok, [city], None)
    assert alone.delta.meta.get("other_prompts", 0) == 0
    assert held.delta.meta["other_prompts"] == 2
    assert set(held.state.meta["held_siblings"][city.subject]) == {job.prompt, lang.prompt}
    assert not torch.allclose(held.delta.dense(name), alone.delta.dense(name), atol=1e-6)
    # the same holds as a state that had already seen those relations' edits
    seen = replace(alone.state, meta={**alone.state.meta, "prompt_relations": known}, tensors={})
    again = get_editor("nse", stats_dir=str(tmp_path), other_prompts=4, **KW).edit(model, tok, [city], seen)
    assert again.delta.meta["other_prompts"] == 2


def test_relation_prompts_are_templates_and_need_other_prompts(tiny_llama):
    import pytest

    from editing.editors.siblings import relation_prompts_of
    from editing.errors import HyperparameterError

    with pytest.raises(HyperparameterError, match="'{}' where the subject"):
        get_editor("nse", other_prompts=2, relation_prompts={"The capital of France is": "capital"})
    with pytest.raises(HyperparameterError, match="'{}' where the subject"):
        get_editor("nse", other_prompts=2, relation_prompts=["The capital of {} is"])
    # other_prompts may come from the model's preset, known only with the model: the edit refuses them there
    lone = get_editor("nse", relation_prompts={"The capital of {} is": "capital"})
    with pytest.raises(HyperparameterError, match="set other_prompts"):
        lone.settings_for(tiny_llama[0])
    reqs = [FactRequest("a", "The capital of {} is", "France", "Rome", relation="capital"),
            FactRequest("b", "The capital of {} is", "Spain", "Rome", relation="seat"),
            FactRequest("c", "{} is a country in", "Spain", "Asia")]
    assert relation_prompts_of(reqs) == {"The capital of {} is": "capital", "{} is a country in": None}
    assert relation_prompts_of(reqs, {"The capital of {} is": None}) == {"The capital of {} is": None,
                                                                         "{} is a country in": None}

"""The synthetic fact world: determinism, request shape, and the tiny model trained on it."""
from __future__ import annotations

import json

from editing.data.world import RELATIONS, generate_world, read_fact_requests, write_jsonl


def _dump(world) -> str:
    return json.dumps([r.to_dict() for r in world.requests] + world.filler + world.heldout_filler + world.fact_sentences())


def test_same_seed_same_world_different_seed_different():
    assert _dump(generate_world(3, 20)) == _dump(generate_world(3, 20))
    assert _dump(generate_world(3, 20)) != _dump(generate_world(4, 20))


def test_requests_are_counterfact_shaped():
    world = generate_world(0, 20)
    assert len(world.requests) == 20 * len(RELATIONS) and len(RELATIONS) >= 10
    for req in world.requests:
        rel = world.relation(req.relation)
        assert "{}" in req.prompt and req.subject in req.text
        assert req.target_true == world.facts[(req.subject, req.relation)]
        assert req.target_new != req.target_true and req.target_new in rel.objects
        assert len(req.paraphrases) >= 2 and all(req.subject in p for p in req.paraphrases)
        assert len(req.neighbours) >= 5
        by_prompt = {req.prompt.format(e): e for e in world.entities}
        for probe in req.neighbours:
            other = by_prompt[probe.prompt]
            assert other != req.subject and world.facts[(other, req.relation)] == probe.target


def test_profile_lines_list_every_object_after_the_name_and_leave_requests_alone():
    plain, with_profiles = generate_world(0, 20), generate_world(0, 20, n_profile_lines=3)
    assert plain.profiles == [] and _dump(plain) == _dump(with_profiles)  # same requests, facts and filler
    assert len(with_profiles.profiles) == 3 * 20
    for line in with_profiles.profiles:
        e = next(x for x in with_profiles.entities if line.startswith(x + " "))
        objs = line[len(e) + 1:-1].split(", ")
        assert sorted(objs) == sorted(with_profiles.facts[(e, r.name)] for r in with_profiles.relations)
    assert set(with_profiles.profiles) <= set(with_profiles.training_texts())


def test_biographies_name_the_subject_once_state_its_true_facts_and_leave_requests_alone():
    plain, with_bios = generate_world(0, 20), generate_world(0, 20, n_biographies=3, bio_facts=4)
    assert plain.biographies == [] and _dump(plain) == _dump(with_bios)
    assert len(with_bios.biographies) == 3 * 20
    sentences_of = {}  # every training sentence a biography may use, per (entity, "who")
    for e in with_bios.entities:
        for who in (e, "they", "They"):
            for r in with_bios.relations:
                for t in r.templates[: with_bios.n_train_templates]:
                    if who == "They" and not t.startswith("{}") or who == "they" and t.startswith("{}"):
                        continue
                    sentences_of.setdefault((e, who == e), set()).add(f"{t.format(who)} {with_bios.facts[(e, r.name)]}.")
    for bio in with_bios.biographies:
        (e,) = [x for x in with_bios.entities if x in bio.split(". ")[0]]
        assert bio.count(e) == 1
        parts = [p + "." for p in bio.split(". ")]
        parts[-1] = parts[-1][:-1]
        assert len(parts) == 4 and parts[0] in sentences_of[(e, True)]
        assert all(p in sentences_of[(e, False)] for p in parts[1:])
    assert set(with_bios.biographies) <= set(with_bios.training_texts())


def test_paraphrase_templates_held_out_for_unseen_subjects():
    world = generate_world(0, 20)
    corpus = "\n".join(world.training_texts())
    unseen = [e for e in world.entities if e not in world.para_seen]
    assert unseen and len(world.para_seen) > 0
    for req in world.requests:
        for p in req.paraphrases:
            assert (p in corpus) == (req.subject in world.para_seen)
    assert set(world.heldout_filler) - set(world.filler)


def test_jsonl_round_trip(tmp_path):
    world = generate_world(1, 10)
    path = tmp_path / "r.jsonl"
    assert write_jsonl(world.requests, path) == len(world.requests)
    assert read_fact_requests(path) == world.requests


def test_tiny_fact_model_knows_its_facts(tiny_fact_model):
    from editing.models import load
    from editing.training.causal import topk_accuracy

    loaded = load(tiny_fact_model.model_dir)
    requests = read_fact_requests(tiny_fact_model.requests_path)
    assert len(requests) == 300 and tiny_fact_model.corpus
    from editing.requests import Probe

    probes = [Probe(r.text, r.target_true) for r in requests]
    acc = topk_accuracy(loaded.model, loaded.tokenizer, probes)
    assert acc >= 0.9, tiny_fact_model.metrics
    # some objects are multi-token under the world's own BPE
    lengths = {len(loaded.tokenizer(" " + r.target_true, add_special_tokens=False)["input_ids"]) for r in requests}
    assert max(lengths) > 1


def test_project_factworld_params_give_at_least_1000_requests():
    from pathlib import Path

    import yaml

    params = yaml.safe_load((Path(__file__).parents[2] / "params.yaml").read_text())["factworld"]
    world = generate_world(params["seed"], params["n_entities"], params["n_relations"], n_filler=params["n_filler"])
    assert len(world.requests) >= 1000
    assert len({r.request_id for r in world.requests}) == len(world.requests)
    assert len(set(world.entities)) == params["n_entities"]


def test_fact_model_mlp_width_is_a_parameter(tmp_path):
    """``n_inner`` sets the MLP width (the editors' key dimension); None keeps GPT-2's 4·n_embd."""
    from editing.models import load
    from editing.training.causal import build_fact_model, build_tokenizer, gpt2_config

    paths = build_fact_model(tmp_path, n_entities=8, n_relations=2, n_layer=1, n_embd=32, n_head=2, n_inner=96,
                             vocab_size=400, steps=2, batch_size=4, n_filler=10)
    loaded = load(paths.model_dir)
    assert loaded.model.transformer.h[0].mlp.c_proj.weight.shape == (96, 32)  # Conv1D: (d_in, d_out)
    assert paths.metrics["d_ff"] == 96
    tok = build_tokenizer(["a b c"], vocab_size=300)
    assert gpt2_config(tok, n_embd=32, n_head=2).n_inner is None  # GPT-2 then uses 4 · n_embd

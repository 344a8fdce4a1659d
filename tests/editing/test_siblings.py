"""Sibling subjects: parsed from the model's list continuation, their keys held in place by the solve.

(That SmolLM2 names countries after "France" is checked with the converted model in test_data_smollm.py.)
"""
from __future__ import annotations

import pytest

from editing.arch import spec_for
from editing.editors import get_editor
from editing.editors.keys import compute_keys
from editing.editors.siblings import parse_list_items, sibling_requests, sibling_subjects
from editing.models import fingerprint
from tinyworld import facts, requests, siblings_from_world, tiny_llama  # noqa: F401  (fixtures)

FAST = {"layers": [0], "locus": "subject", "lam": 30.0, "value": {"context_templates": ("{}",), "steps": 15}}


def test_list_items_are_parsed_deduplicated_and_exclude_edited_subjects():
    text = " Italy, Germany and Spain, italy; France or (Portugal), 42, a very long item that is not a name at all really"
    assert parse_list_items(text, exclude=["France"]) == ["Italy", "Germany", "Spain", "Portugal"]


def test_a_short_context_falls_back_to_the_bare_list_start(tiny_llama, facts, caplog):
    model, tok = tiny_llama  # context 32 < the list prompt plus 24 new tokens
    with caplog.at_level("WARNING"):
        named = sibling_subjects(model, tok, requests(facts, 1)[0].subject, 4)
    assert not any("maximum length" in r.getMessage() for r in caplog.records)  # generation stayed in context
    assert all(len(s) <= 40 for s in named)


def test_sibling_keys_are_held_in_place(tiny_llama, facts, tmp_path, monkeypatch):
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 3)
    siblings_from_world(monkeypatch, reqs)
    sibs = sibling_requests(model, tok, reqs, 2)
    assert len(sibs) == 6 and all(s.prompt in {r.prompt for r in reqs} for s in sibs)
    kw = {**FAST, "stats_dir": str(tmp_path), "corpus": "samples:8", "accumulate": True}
    fp = fingerprint(model)
    plain = get_editor("nse", siblings=0, **kw).edit(model, tok, reqs, None)
    held = get_editor("nse", siblings=2, sibling_weight=1.0, **kw).edit(model, tok, reqs, None)
    assert fingerprint(model) == fp
    assert held.delta.meta["siblings"]["n"] == len(sibs)
    ks = compute_keys(model, tok, spec, sibs, 0, ("{}",))
    name = spec.mlp_out_name(0) + ".weight"

    def moved(res):  # ‖ΔW k_s‖ / ‖ΔW‖: how far the sibling keys move per unit of update
        dw = res.delta.dense(name).float()
        return float((ks @ dw.T).norm() / dw.norm())

    assert moved(held) < 0.5 * moved(plain)
    # the sibling moment is accumulated with the edit keys for later batches
    c = next(k for k in held.state.tensors if k.endswith("::C_edits"))
    assert float(held.state.tensors[c].trace()) > float(plain.state.tensors[c].trace())


def test_known_siblings_are_earlier_edited_subjects_never_this_batchs(tiny_llama, facts, tmp_path):
    """``known_siblings``: subjects from the state's ledger, seeded, never a subject of the batch or excluded."""
    import warnings

    from editing.editors.siblings import known_sibling_requests

    reqs = requests(facts, 6)
    known = [r.subject for r in reqs[:4]]
    sibs = known_sibling_requests(reqs[3:5], known, 2, exclude=[known[0]], seed=7)
    batch = {r.subject for r in reqs[3:5]}
    assert sibs and all(s.subject in known and s.subject not in batch and s.subject != known[0] for s in sibs)
    assert all(s.prompt == r.prompt for s, r in zip(sibs, [q for q in reqs[3:5] for _ in range(2)]))
    assert sibs == known_sibling_requests(reqs[3:5], known, 2, exclude=[known[0]], seed=7)
    assert known_sibling_requests(reqs[:1], [], 3) == []
    model, tok = tiny_llama
    ed = get_editor("nse", siblings=0, known_siblings=2, **FAST, stats_dir=str(tmp_path), corpus="samples:8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = ed.edit(model, tok, reqs[:2], None)
        second = ed.edit(model, tok, reqs[2:4], first.state)
    assert "siblings" not in first.delta.meta              # nothing edited before: nothing known
    edited = set(first.state.meta["subject_prompts"]) - {r.subject for r in reqs[2:4]}
    assert set(second.delta.meta["siblings"]["examples"]) <= edited and second.delta.meta["siblings"]["n"] > 0


def test_sibling_samples_bounds_the_lists_each_request_samples(tiny_llama, facts, tmp_path, monkeypatch):
    """``sibling_samples`` is how many lists ``sibling_lists`` may sample per request; it must be a whole number ≥ 1."""
    from editing.editors import siblings as siblings_mod
    from editing.editors.hparams import EditHparams
    from editing.errors import HyperparameterError

    model, tok = tiny_llama
    asked = []
    real = siblings_mod.sibling_lists
    monkeypatch.setattr(siblings_mod, "sibling_lists",
                        lambda *a, samples=3, **kw: asked.append(samples) or real(*a, samples=samples, **kw))
    reqs = requests(facts, 2)
    get_editor("nse", siblings=2, sibling_samples=5, **FAST, stats_dir=str(tmp_path), corpus="samples:8") \
        .edit(model, tok, reqs, None)
    assert asked == [5]
    for bad in (0, 2.5, True):
        with pytest.raises(HyperparameterError, match="sibling_samples"):
            EditHparams(sibling_samples=bad)


def test_candidate_requests_are_each_subject_once_per_prompt_never_the_batchs(facts):
    """``sibling_pool``'s candidates: the named siblings, then the latest ``per_prompt`` known subjects in each
    distinct prompt of the batch; no subject of the batch, none excluded, no (subject, prompt) twice."""
    from dataclasses import replace

    from editing.editors.siblings import candidate_requests

    reqs = requests(facts, 3)
    batch = [reqs[0], reqs[1], replace(reqs[2], prompt=reqs[0].prompt)]   # two distinct prompts
    named = [replace(batch[0], subject="Kuro Bet"), replace(batch[2], subject="Kuro Bet"),  # same pair twice
             replace(batch[1], subject=batch[0].subject)]                                  # a batch subject
    known = ["Lesa Nim", "Ivo Lam", "Kuro Bet", "Ivo Lam", batch[1].subject, "Jena Fos"]
    out = candidate_requests(batch, named, known, per_prompt=2, exclude=["Jena Fos"])
    pairs = [(c.subject, c.prompt) for c in out]
    assert len(pairs) == len(set(pairs))
    assert not {c.subject for c in out} & ({r.subject for r in batch} | {"Jena Fos"})
    # the latest two known subjects allowed ("Ivo Lam", "Kuro Bet") in each of the two prompts; "Kuro Bet" was
    # named in prompt 0 already, so it is there once
    assert sorted(pairs) == sorted({("Kuro Bet", batch[0].prompt), ("Ivo Lam", batch[0].prompt),
                                    ("Ivo Lam", batch[1].prompt), ("Kuro Bet", batch[1].prompt)})
    assert candidate_requests(batch, [], known, per_prompt=0) == []


@pytest.mark.filterwarnings("ignore::editing.editors.memit.EditDidNotTakeWarning")  # the selection, not the edits, is tested
def test_sibling_pool_holds_the_candidates_the_update_would_move_most(tiny_llama, facts, tmp_path, monkeypatch):
    """With ``sibling_pool``, the held siblings are the ``siblings × batch`` candidates with the largest
    ``‖ΔW k_c‖`` under the update solved without them, and the re-solved update moves them less."""
    import torch

    from editing.editors.hparams import EditHparams
    from editing.editors.siblings import candidate_requests
    from editing.errors import HyperparameterError

    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 2)
    siblings_from_world(monkeypatch, reqs)
    kw = {**FAST, "stats_dir": str(tmp_path), "corpus": "samples:8", "accumulate": True, "repasses": 0,
          "sibling_weight": 1.0}
    plain = get_editor("nse", siblings=0, **kw).edit(model, tok, reqs, None)
    pooled = get_editor("nse", siblings=1, sibling_pool=4, **kw).edit(model, tok, reqs, None)
    pool = candidate_requests(reqs, sibling_requests(model, tok, reqs, 4), [], 0)
    assert pooled.delta.meta["sibling_pool"] == len(pool) == 8
    name = spec.mlp_out_name(0) + ".weight"
    kc = compute_keys(model, tok, spec, pool, 0, ("{}",))
    leak = (kc @ plain.delta.dense(name).float().T).norm(dim=1)
    top = {pool[int(j)].subject for j in torch.argsort(leak, descending=True)[:2]}
    held = pooled.state.meta["held_siblings"]
    assert set(held) == top and pooled.delta.meta["siblings"]["n"] == 2
    chosen = [j for j, c in enumerate(pool) if c.subject in top and c.prompt in held[c.subject]]
    after = (kc[chosen] @ pooled.delta.dense(name).float().T).norm(dim=1)
    assert float(after.sum()) < 0.5 * float(leak[chosen].sum())
    for bad in (-1, 1.5, True):
        with pytest.raises(HyperparameterError, match="sibling_pool"):
            EditHparams(sibling_pool=bad)
    with pytest.raises(HyperparameterError, match="release_siblings"):
        EditHparams(sibling_pool=4, release_siblings=True)


@pytest.mark.filterwarnings("ignore::editing.editors.memit.EditDidNotTakeWarning")  # the selection, not the edits, is tested
def test_sibling_leak_holds_every_candidate_the_update_moves_past_the_share(tiny_llama, facts, tmp_path, monkeypatch):
    """``sibling_leak=s``: no fixed count; held are exactly the candidates with ``‖ΔW k_c‖ ≥ s · median_i ‖ΔW k_i‖``
    under the update solved without them (``k_i`` the batch's own keys), however many that is."""
    import torch

    from editing.editors.hparams import EditHparams
    from editing.editors.siblings import candidate_requests
    from editing.errors import HyperparameterError

    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 2)
    siblings_from_world(monkeypatch, reqs)
    kw = {**FAST, "stats_dir": str(tmp_path), "corpus": "samples:8", "accumulate": True, "repasses": 0,
          "sibling_weight": 1.0, "sibling_pool": 4}
    plain = get_editor("nse", siblings=0, **{**kw, "sibling_pool": 0}).edit(model, tok, reqs, None)
    pool = candidate_requests(reqs, sibling_requests(model, tok, reqs, 4), [], 0)
    name = spec.mlp_out_name(0) + ".weight"
    dw = plain.delta.dense(name).float()
    own = (compute_keys(model, tok, spec, reqs, 0, ("{}",)) @ dw.T).norm(dim=1).median()
    ratio = (compute_keys(model, tok, spec, pool, 0, ("{}",)) @ dw.T).norm(dim=1) / own
    ranked = torch.sort(ratio, descending=True).values
    assert len(pool) == 8 and float(ranked[2] - ranked[3]) > 1e-3
    share = float(ranked[2] + ranked[3]) / 2   # three candidates above it: not the fixed siblings × batch = 2
    res = get_editor("nse", siblings=1, sibling_leak=share, **kw).edit(model, tok, reqs, None)
    above = {(c.subject, c.prompt) for c, x in zip(pool, ratio.tolist()) if x >= share}
    held = res.state.meta["held_siblings"]
    assert {(s, p) for s, ps in held.items() for p in ps} == above and len(above) == 3
    assert res.delta.meta["sibling_leak_held"] == {"0": 3}
    none = get_editor("nse", siblings=1, sibling_leak=float(ranked[0]) * 2, **kw).edit(model, tok, reqs, None)
    assert none.state.meta["held_siblings"] == {} and none.delta.meta["sibling_leak_held"] == {"0": 0}
    assert torch.allclose(none.delta.dense(name), plain.delta.dense(name))
    for bad in (-0.1, True, "x"):
        with pytest.raises(HyperparameterError, match="sibling_leak"):
            EditHparams(siblings=1, sibling_pool=4, sibling_leak=bad)
    with pytest.raises(HyperparameterError, match="sibling_leak"):
        EditHparams(siblings=1, sibling_leak=0.3)


def test_vocabulary_neighbours_are_the_nearest_whole_words_of_the_subjects_case(tiny_llama, facts):
    """The words whose input embedding is nearest the mean of the subject's tokens' embeddings, in order of
    cosine; never the subject's own tokens, a batch subject, an excluded word or a word of the other case."""
    import copy

    import torch

    from editing.editors.siblings import _word_tokens, vocabulary_neighbours

    model, tok = tiny_llama
    model = copy.deepcopy(model)   # the fixture is shared: its embeddings stay as trained
    subject = requests(facts, 1)[0].subject
    own = tok(" " + subject, add_special_tokens=False)["input_ids"]
    assert len(own) == 2
    vocab = tok.get_vocab()
    # candidates in id order: get_vocab()'s order is a hash map's, other on each run
    ids, words = _word_tokens(tok)
    names = [(i, w) for i, w in zip(ids.tolist(), words) if w[0].isupper() and i not in own]
    (near_id, near), (nearer_id, nearer), (excluded_id, excluded) = names[:3]
    lowercase = "is"
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q = emb[own].mean(0)
        emb[nearer_id] = q + 0.05 * q.norm() * torch.randn(q.shape, generator=g) / q.numel() ** 0.5
        emb[near_id] = q + 0.3 * q.norm() * torch.randn(q.shape, generator=g) / q.numel() ** 0.5
        emb[excluded_id] = q
        emb[vocab[lowercase]] = q
    got = vocabulary_neighbours(model, tok, [subject], 3, exclude=[excluded])[0]
    assert got[:2] == [nearer, near] and len(got) == 3
    assert not {lowercase, excluded, *subject.split()} & set(got)
    assert all(w[0].isupper() and w in vocab for w in got)
    assert vocabulary_neighbours(model, tok, [subject], 0) == [[]]


@pytest.mark.filterwarnings("ignore::editing.editors.memit.EditDidNotTakeWarning")  # the candidates, not the edits, are tested
def test_sibling_vocab_puts_the_vocabulary_neighbours_among_the_candidates(tiny_llama, facts, tmp_path, monkeypatch):
    """``sibling_vocab=n``: each request's ``n`` vocabulary neighbours in its prompt are the pool (no lists, no
    ledger with ``sibling_pool=0``), and the ``siblings × batch`` held are among them."""
    from editing.editors.hparams import EditHparams
    from editing.editors.siblings import candidate_requests, vocabulary_sibling_requests
    from editing.errors import HyperparameterError

    model, tok = tiny_llama
    reqs = requests(facts, 2)
    siblings_from_world(monkeypatch, reqs)
    kw = {**FAST, "stats_dir": str(tmp_path), "corpus": "samples:8", "accumulate": True, "repasses": 0}
    res = get_editor("nse", siblings=2, sibling_vocab=3, **kw).edit(model, tok, reqs, None)
    pool = candidate_requests(reqs, vocabulary_sibling_requests(model, tok, reqs, 3), [], 0)
    assert res.delta.meta["sibling_pool"] == len(pool) > 4   # 2 × 3 named; a word both requests name in their one prompt counts once
    held = res.state.meta["held_siblings"]
    assert sum(len(p) for p in held.values()) == 4
    assert {(s, p) for s, ps in held.items() for p in ps} <= {(c.subject, c.prompt) for c in pool}
    for bad in (-1, 2.5, True):
        with pytest.raises(HyperparameterError, match="sibling_vocab"):
            EditHparams(sibling_vocab=bad)
    with pytest.raises(HyperparameterError, match="release_siblings"):
        EditHparams(sibling_vocab=4, release_siblings=True)
    with pytest.raises(HyperparameterError, match="siblings ≥ 1"):
        EditHparams(siblings=0, sibling_vocab=4)

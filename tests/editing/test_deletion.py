"""Rank-one behaviour deletion: Marian (sequential), causal GPT-2, T5/BART layouts, metrics, bad input."""
from __future__ import annotations

import pytest
import torch

from editing.editors import get_editor
from editing.arch import spec_for
from editing.editors.base import EditorState
from editing.editors.deletion import RankOneDeletionEditor
from editing.editors.deletion_corpus import training_corpus_for
from editing.editors.rewrite import apply_rewrite, rewrite_of
from editing.errors import NothingToDeleteError, PromptTooLongError, RequestError
from editing.metrics.deletion import (cache_base_outputs, chrf, contains_span, evaluate_deletions,
                                      generate_outputs)
from editing.models import fingerprint
from editing.requests import DeletionRequest, TranslationProbe
from tinytranslation import causal_requests, tiny_corpus, tiny_gpt2_translator, tiny_marian  # noqa: F401


# ------------------------------------------------------------------ metrics on hand-made cases
def test_contains_span_matches_whole_words():
    assert contains_span("la casa roja", "casa")
    assert contains_span("la  casa roja", "la casa")
    assert not contains_span("la casas roja", "casa")
    assert not contains_span("", "casa")


def test_chrf_hand_cases():
    assert chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert chrf(["zzz qqq"], ["the cat sat"]) < 10
    assert 0 < chrf(["the cat sit"], ["the cat sat"]) < 100


def test_rewrite_is_read_off_the_one_positive():
    # a hallucinated word is deleted, a mistranslated word replaced; the span must occur in the greedy output
    assert rewrite_of("zeme rizor Ravi dine rapigi zise", "zeme rizor Ravi dine rapigi", "zise") == (["zise"], [])
    assert rewrite_of("tuge rizor Pavel digus", "tuge kabu Pavel digus", "rizor") == (["rizor"], ["kabu"])
    assert rewrite_of("tuge felon zeme nipa", "Rose zeme nipa", "felon") == (["tuge", "felon"], ["Rose"])
    assert rewrite_of("a b c", "a b d", "x") is None
    # applied to another output of the model: only where the span occurs exactly once
    assert apply_rewrite("zeme litas zeme rizor neni", (["rizor"], ["kabu"]), "rizor") == "zeme litas zeme kabu neni"
    assert apply_rewrite("x rapigi zise y", (["zise"], []), "zise") == "x rapigi y"
    assert apply_rewrite("rizor zeme rizor", (["rizor"], ["kabu"]), "rizor") is None
    assert apply_rewrite("zeme neni", (["rizor"], ["kabu"]), "rizor") is None
    assert apply_rewrite("zeme felon nipa", (["tuge", "felon"], ["Rose"]), "felon") is None   # context differs


def test_statistics_corpus_rule(tmp_path):
    """explicit sources > stats_corpus file (+ locality) > a project model's training sources > locality."""
    import json

    from transformers import MarianConfig, MarianMTModel

    root = tmp_path / "proj"
    (root / "models" / "translator-marian").mkdir(parents=True)
    (root / "data" / "translation").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    train = root / "data" / "translation" / "train.jsonl"
    train.write_text("".join(json.dumps({"source": f"s{i}", "target": f"t{i}"}) + "\n" for i in range(40)))
    cfg = MarianConfig(vocab_size=16, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
                       decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=16,
                       pad_token_id=0, decoder_start_token_id=0)
    model = MarianMTModel(cfg)
    req = DeletionRequest("r", "a b", "c", "d", locality=(TranslationProbe("loc one"), TranslationProbe("loc two")))
    ed = RankOneDeletionEditor(stats_dir=None)
    # a model that is not a project model: the requests' locality sources
    assert training_corpus_for(model) is None
    assert ed.corpus_sources(model, [req]) == (["loc one", "loc two"], "locality")
    # the project's translator directory: its training sources
    model.config._name_or_path = str(root / "models" / "translator-marian")
    assert training_corpus_for(model) == train.resolve()
    texts, origin = ed.corpus_sources(model, [req])
    assert texts == [f"s{i}" for i in range(40)] and origin == "training:train.jsonl"
    # a stats corpus file (plain lines) replaces it, plus the locality sources
    extra = tmp_path / "corpus.txt"
    extra.write_text("first line\n\nsecond line\n")
    assert RankOneDeletionEditor(stats_corpus=str(extra)).corpus_sources(model, [req])[0] == [
        "first line", "second line", "loc one", "loc two"]
    assert RankOneDeletionEditor(stats_sources=("x", "y")).corpus_sources(model, [req])[0] == ["x", "y"]
    # the held-out split for the λ rule never holds request probes
    split = RankOneDeletionEditor(heldout=8).\
        _split(model, [DeletionRequest("r", "s0", "c", "d", locality=(TranslationProbe("s39"),))])
    assert len(split["heldout"]) == 8 and not {"s0", "s39"} & set(split["heldout"])
    assert not set(split["heldout"]) & set(split["stats"])
    with pytest.raises(Exception, match="does not exist"):
        RankOneDeletionEditor(stats_corpus=str(tmp_path / "missing.txt")).corpus_sources(model, [req])


# ------------------------------------------------------------------ Marian, sequential
@pytest.mark.slow
def test_sequential_deletions_on_tiny_marian(tiny_corpus, tiny_marian, tmp_path):
    model, tok, _ = tiny_marian
    model = _copy(model)
    requests = tiny_corpus.requests
    base = cache_base_outputs(model, tok, requests, tiny_corpus.test)
    before = evaluate_deletions(model, tok, requests, base, unrelated=tiny_corpus.test)
    assert before.instance_gone == 0.0 and before.locality_exact == 1.0
    stats_dir = tmp_path / "stats"
    editor = get_editor("rank-one", stats_sources=[s for s, _ in tiny_corpus.train[:200]],
                        on_nothing_to_delete="skip", stats_dir=str(stats_dir))
    state = None
    sizes = []
    base_fp = fingerprint(model)
    n_variants = []
    for i, r in enumerate(requests):
        fp = fingerprint(model)
        result = editor.edit(model, tok, [r], state)
        assert fingerprint(model) == fp, "edit() must leave the model bit-for-bit as it found it"
        d = result.diagnostics[0]
        if d.extra.get("nothing_to_delete"):        # an earlier deletion already removed it: reported, not edited
            assert not result.delta.factors
            continue
        assert d.succeeded, d.message
        assert d.extra["site"]["stack"] in ("encoder", "decoder") and d.extra["trace"]
        n_variants.append(d.extra["n_variants"])
        assert all(result.delta.rank(w) == 1 for w in result.delta.weight_names)   # rank one per request
        path = tmp_path / f"delta{i}.safetensors"
        result.delta.save(path)
        type(result.delta).load(path, expect_fingerprint=fp).apply(model)
        state = result.state
        sizes.append({k: tuple(v.shape) for k, v in state.tensors.items()})
        # earlier deletions re-checked after each one
        rep = evaluate_deletions(model, tok, requests[: i + 1])
        assert rep.instance_gone == 1.0, [(s.request_id, s.instance_output) for s in rep.per_request]
    final = evaluate_deletions(model, tok, requests, base, unrelated=tiny_corpus.test)
    assert final.instance_gone == 1.0
    assert final.locality_exact >= 0.9 and final.chrf >= final.base_chrf - 5
    assert final.generalization_gone is not None and final.generalization_gone >= 0.5   # measured 0.625
    assert max(n_variants) > 0, "no self-generated variant was found"
    # C0 was cached on disk under the BASE model's fingerprint, one file per traced module
    files = sorted((stats_dir / base_fp[:16]).glob("*.safetensors"))
    assert files
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
        cached = f.get_tensor("moment")
    assert meta["fingerprint"] == base_fp and int(meta["count"]) > 0
    module = meta["module"]
    # a fresh edit of the base model reuses the cached C0 (the file is not rewritten)
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again_model = _copy(tiny_marian[0])
    res = editor.edit(again_model, tok, [requests[0]])
    if f"{module}.weight::C0" in res.state.tensors:
        assert torch.equal(res.state.tensors[f"{module}.weight::C0"], cached)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    # the state is fixed-size per edited weight and reloads
    state.save(tmp_path / "state.safetensors")
    again = EditorState.load(tmp_path / "state.safetensors", editor="rank-one")
    assert {k: tuple(v.shape) for k, v in again.tensors.items()} == sizes[-1]


# ------------------------------------------------------------------ causal LM
@pytest.mark.slow
def test_deletes_an_unwanted_continuation_of_a_causal_gpt2(tiny_corpus, tiny_gpt2_translator):
    model, tok, _ = tiny_gpt2_translator
    requests = causal_requests(tiny_corpus.requests)
    outs = generate_outputs(model, tok, [r.source for r in requests])
    produced = [r for r, o in zip(requests, outs) if contains_span(o, r.unwanted)]
    assert produced, f"the tiny GPT-2 reproduces none of the behaviours: {outs}"
    r = produced[0]
    base = cache_base_outputs(model, tok, [r])
    fp = fingerprint(model)
    editor = get_editor("rank-one", stats_sources=[f"{s} =>" for s, _ in tiny_corpus.train[:200]],
                        stats_dir=None)
    result = editor.edit(model, tok, [r])
    assert fingerprint(model) == fp
    assert result.diagnostics[0].succeeded, result.diagnostics[0].message
    assert result.delta.weight_names[0].startswith("transformer.h.") and result.delta.weight_names[0].endswith(
        "mlp.c_proj.weight")
    result.delta.apply(model)
    try:
        rep = evaluate_deletions(model, tok, [r], base)
        assert rep.instance_gone == 1.0
        assert rep.locality_exact >= 0.75
    finally:
        result.delta.remove(model)


# ------------------------------------------------------------------ T5 / BART layouts
PAIRS = [("the cat sees a dog", "cat dog red see"), ("a big house", "house big"),
         ("the small tree", "tree small"), ("the dog likes a cat", "dog cat like")]


def _overfit(arch: str):
    """A tiny model of ``arch`` overfit in seconds on four pairs; the first pair plants 'red' (unwanted)."""
    from editing.training.seq2seq import ModelSize, train_translator

    words = sorted({w for s, t in PAIRS for w in (s + " " + t).split()})
    model, tok, _ = train_translator(PAIRS, words, arch=arch, size=ModelSize(d_model=32, layers=2, heads=2, d_ff=64),
                                     epochs=200, batch_size=4, lr=5e-3, seed=0)
    return model, tok


@pytest.mark.parametrize("arch", ["t5", "bart"])   # Marian: test_sequential_deletions_on_tiny_marian
def test_edits_every_seq2seq_layout(arch):
    model, tok = _overfit(arch)
    src, tgt = PAIRS[0]
    assert generate_outputs(model, tok, [src])[0] == tgt
    req = DeletionRequest("r1", src, "red", "cat dog see", locality=tuple(TranslationProbe(s, t) for s, t in PAIRS[1:]))
    base = cache_base_outputs(model, tok, [req])
    fp = fingerprint(model)
    result = get_editor("rank-one", stats_dir=None).edit(model, tok, [req])
    assert fingerprint(model) == fp
    d = result.diagnostics[0]
    assert d.succeeded, d.message
    layout = {"t5": "DenseReluDense.wo.weight", "bart": "fc2.weight", "marian": "fc2.weight"}[arch]
    assert result.delta.weight_names[0].endswith(layout)
    result.delta.apply(model)
    rep = evaluate_deletions(model, tok, [req], base)
    assert rep.instance_gone == 1.0 and rep.locality_exact >= 2 / 3


# ------------------------------------------------------------------ bad input
def test_bad_input_is_a_typed_error():
    model, tok = _overfit("bart")
    src = PAIRS[0][0]
    out = generate_outputs(model, tok, [src])[0].split()
    absent = "house"
    assert absent not in out
    editor = get_editor("rank-one", stats_sources=["the dog likes a tree"], stats_dir=None)
    with pytest.raises(NothingToDeleteError, match="nothing to delete"):
        editor.edit(model, tok, [DeletionRequest("r1", src, absent, "the dog")])
    skipped = get_editor("rank-one", stats_sources=["a dog"], on_nothing_to_delete="skip", stats_dir=None).edit(
        model, tok, [DeletionRequest("r1", src, absent, "the dog")])
    assert not skipped.diagnostics[0].succeeded and skipped.diagnostics[0].extra["nothing_to_delete"]
    assert not skipped.delta.factors
    with pytest.raises(RequestError, match="positive example equals"):
        DeletionRequest("r2", src, "the cat", "the cat")
    too_long = " ".join(["cat"] * 80)  # the tiny model accepts 64 positions
    with pytest.raises(PromptTooLongError, match="accepts 64"):
        editor.edit(model, tok, [DeletionRequest("r3", too_long, out[0], "the dog")])
    with pytest.raises(RequestError, match="not a DeletionRequest"):
        from editing.requests import FactRequest

        editor.edit(model, tok, [FactRequest("f", "{} is", "cat", "dog")])


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.slow
def test_the_same_request_under_another_id_gives_the_same_edit(tiny_corpus, tiny_marian):
    """The draws behind the variants and negatives are seeded by the request's content: a resubmitted ticket (or
    a demo stamped with another time) is edited exactly as before, whatever its id."""
    from dataclasses import replace

    model, tok, _ = tiny_marian
    req = tiny_corpus.requests[0]
    editor = get_editor("rank-one", stats_sources=[s for s, _ in tiny_corpus.train[:200]])
    first, again = (editor.edit(model, tok, [replace(req, request_id=rid)]) for rid in ("ticket-0001", "resent-77"))
    assert first.diagnostics[0].succeeded and again.diagnostics[0].succeeded
    assert first.diagnostics[0].extra["n_variants"] > 0   # the draw was used
    assert first.delta.weight_names == again.delta.weight_names
    for name in first.delta.weight_names:
        assert all(torch.equal(a, b) for a, b in zip(first.delta.factors[name], again.delta.factors[name]))
    assert again.delta.request_ids == ["resent-77"]
    # another salt is another draw: the variants come from other sentences
    salted = get_editor("rank-one", stats_sources=[s for s, _ in tiny_corpus.train[:200]], draw_salt="1")
    other = salted.edit(model, tok, [req])
    assert any(not torch.equal(a, b) for n in first.delta.weight_names if n in other.delta.factors
               for a, b in zip(first.delta.factors[n], other.delta.factors[n])) or \
        first.delta.weight_names != other.delta.weight_names


@pytest.mark.slow
def test_validation_variants_choose_the_site_and_are_never_fitted(tiny_corpus, tiny_marian):
    """Variants beyond ``n_variants`` come from later sentences of the same draw and only judge sites: the fitted
    variants are the ones drawn without them, a site is kept only when its write also deletes the span from them
    (else the best of the tried sites by them), and at a given site the delta is the one computed without them."""
    model, tok, _ = tiny_marian
    req = tiny_corpus.requests[0]
    stats = [s for s, _ in tiny_corpus.train[:200]]
    with_val = RankOneDeletionEditor(stats_sources=stats, stats_dir=None)
    without = RankOneDeletionEditor(stats_sources=stats, stats_dir=None, validation_variants=0)
    assert with_val.validation_variants > 0
    ex = with_val._prepare(model, tok, req)
    assert with_val._decision(model, tok, ex)
    ex.trigger = with_val.trigger_trace(model, tok, ex)[0][0]
    state = with_val._init_state(model, tok, spec_for(model), [req], None)
    fitted, validation = with_val._variants(model, tok, ex, state)
    fitted0, validation0 = without._variants(model, tok, ex, state)
    assert [v.request.source for v in fitted] == [v.request.source for v in fitted0] and not validation0
    assert validation and not {v.request.source for v in validation} & {v.request.source for v in fitted}

    d = with_val.edit(model, tok, [req]).diagnostics[0]
    assert d.succeeded, d.message
    assert d.extra["n_validation"] == len(validation)
    tried = d.extra["value_tried"]
    assert all(0.0 <= t["val"] <= 1.0 for t in tried)
    chosen = [t for t in tried if t["site"] == d.extra["site"]][-1]
    assert chosen["val"] == pytest.approx(d.extra["validation_gone"], abs=1e-3)
    accept = with_val.variant_accept
    passed = [t for t in tried if t["good"] and t["share"] >= accept]      # λ rule met, fitted variants deleted
    if chosen["good"] and chosen["share"] >= accept and chosen["val"] >= accept:
        # accepted: the search stopped there, past every earlier site whose write missed the validation variants
        assert chosen is tried[-1] and all(t["val"] < accept for t in passed[:-1])
    elif passed:
        # none accepted: the best of the sites that met the λ rule, by the validation variants
        assert chosen["good"] and chosen["val"] == max(t["val"] for t in passed)

    # the validation variants never enter the fit: at the chosen site alone the delta is the one made without them
    site = d.extra["site"]
    only = dict(layers=(site["layer"],), stacks=(site["stack"],))
    a = RankOneDeletionEditor(stats_sources=stats, stats_dir=None, **only).edit(model, tok, [req])
    b = RankOneDeletionEditor(stats_sources=stats, stats_dir=None, validation_variants=0, **only).edit(model, tok, [req])
    assert a.diagnostics[0].extra["site"] == b.diagnostics[0].extra["site"] == site
    assert a.delta.weight_names == b.delta.weight_names
    for name in a.delta.weight_names:
        assert all(torch.equal(x, y) for x, y in zip(a.delta.factors[name], b.delta.factors[name]))


def test_site_order_puts_the_lambda_rule_before_the_validation_share():
    """Among tried sites none of which was accepted: a site that met the λ rule (locality floor, earlier deletions
    kept) wins over one that generalises better to the validation variants but broke it; among sites that met it,
    the validation share decides; among sites that broke it, one whose scan fixed the instance comes first; a site
    is accepted only when fitted and validation variants both pass."""
    ed = RankOneDeletionEditor(stats_dir=None)

    def tried(good, val, share=1.0, loc=0.995, margin=3.0, fixed=True):
        return {"good": good, "val": val, "share": share, "loc": loc, "margin": margin, "fixed": fixed}

    broke_rule = tried(False, 1.0, loc=0.90)
    kept_rule = tried(True, 0.25)
    assert max([broke_rule, kept_rule], key=ed._rank) is kept_rule
    better = tried(True, 0.625, loc=0.991)
    assert max([kept_rule, better], key=ed._rank) is better
    # without a good site the old order holds: fitted share, then locality (the validation share is not read)
    a, b = tried(False, 1.0, loc=0.95), tried(False, 0.0, loc=0.98)
    assert max([a, b], key=ed._rank) is b
    # ... but a site where some λ fixed the instance comes first (the instance is the hard bar)
    unfixed = tried(False, 0.0, loc=0.99, fixed=False)
    assert max([unfixed, a], key=ed._rank) is a
    assert ed._accepted(tried(True, 0.75)) and not ed._accepted(tried(True, 0.625))
    assert not ed._accepted(tried(False, 1.0)) and not ed._accepted(tried(True, 1.0, share=0.5))


@pytest.mark.slow
def test_a_trigger_that_carries_the_behaviour_into_few_sentences_is_passed_over(tiny_corpus, tiny_marian):
    """The trigger trace's first token is the trigger unless its variants are fewer than half of ``n_variants``;
    then the next traced tokens that lower the margin, and those whose corruption lowers log P(unwanted) most, are
    tried and the one with the most variants is kept (``trigger_candidates=0``: the first token only)."""
    model, tok, _ = tiny_marian
    req = next(r for r in tiny_corpus.requests if r.request_id.endswith("child"))
    ed = RankOneDeletionEditor(stats_sources=[s for s, _ in tiny_corpus.train[:200]], stats_dir=None)
    ex = ed._prepare(model, tok, req)
    assert ed._decision(model, tok, ex)
    trace = ed.trigger_trace(model, tok, ex)
    state = ed._init_state(model, tok, spec_for(model), [req], None)
    real = trace[0][0]
    assert len(ed._trigger(model, tok, ex, state, trace)[0]) * 2 >= ed.n_variants and ex.trigger == real

    def n_fitted(pos: int) -> int:
        ex.trigger = pos
        return len(ed._variants(model, tok, ex, state)[0])

    weak = [pos for pos, _ in trace[1:] if n_fitted(pos) * 2 < ed.n_variants]
    assert weak, "every token of the sentence carries the behaviour: no weak first candidate to test with"
    # a trace misled onto a weak token first: the real trigger, second, is found by its variants
    fitted, validation = ed._trigger(model, tok, ex, state, [(weak[0], 5.0), (real, 0.5)])
    assert ex.trigger == real and len(fitted) * 2 >= ed.n_variants and validation
    # the trace by log P(unwanted) alone finds it too (corrupting the trigger can lower the positive word as much)
    assert ed.trigger_trace(model, tok, ex, unwanted_only=True)[0][0] == real
    ed._trigger(model, tok, ex, state, [(weak[0], 5.0)])
    assert ex.trigger == real
    # trigger_candidates=0: the trace's first token, whatever it yields
    no_alt = RankOneDeletionEditor(stats_sources=[s for s, _ in tiny_corpus.train[:200]], stats_dir=None,
                                   trigger_candidates=0)
    no_alt._trigger(model, tok, ex, state, [(weak[0], 5.0), (real, 0.5)])
    assert ex.trigger == weak[0]


@pytest.mark.slow
def test_a_site_whose_write_misses_the_validation_variants_is_passed_over(tiny_corpus, tiny_marian, monkeypatch):
    """The search stops at the first site that meets the λ rule only when its write also deletes the validation
    variants: judged (by a stand-in for the editor's own generation check) to delete none, it goes on to the other
    sites and keeps the best of them."""
    model, tok, _ = tiny_marian
    req = tiny_corpus.requests[0]
    stats = [s for s, _ in tiny_corpus.train[:200]]
    passing = RankOneDeletionEditor(stats_sources=stats, stats_dir=None).edit(model, tok, [req]).diagnostics[0]
    tried = passing.extra["value_tried"]
    assert tried[-1]["good"] and tried[-1]["val"] >= 0.75, "the real check passed the first site that met the λ rule"
    monkeypatch.setattr(RankOneDeletionEditor, "_gone_under", lambda self, *args: 0.0)
    missing = RankOneDeletionEditor(stats_sources=stats, stats_dir=None).edit(model, tok, [req]).diagnostics[0]
    assert missing.succeeded, missing.message
    assert len(missing.extra["value_tried"]) > len(tried)     # went on past the site it stopped at before
    assert missing.extra["validation_gone"] == 0.0

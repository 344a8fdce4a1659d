"""The hook editor on tiny fact models (GPT-2 Conv1D and Llama Linear layouts) that know their facts.

Edits are real (keys, values, closed-form solve), the models are trained in seconds
(``tinyworld``); each test works on its own deep copy of the shared model.
"""
from __future__ import annotations

import copy

import pytest
import torch

from editing.delta import LowRankDelta
from editing.editors import get_editor
from editing.editors.base import EditorState
from editing.editors.hook import hook_firing_rate, installed_hooks, load_hooked, save_hooks
from editing.errors import RequestError, StateError
from editing.models import fingerprint
from editing.requests import DeletionRequest
from tinyworld import FILLER, facts, requests, tiny_gpt2, tiny_llama, top1  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def hp(tmp_path_factory):
    """Tiny models recall facts at layer 0; C0 over the model's own samples plus the filler text."""
    root = tmp_path_factory.mktemp("hook")
    corpus = root / "filler.txt"
    corpus.write_text("\n".join(FILLER) + "\n")
    return dict(layers=[0], lam=10.0, context_templates=["{}"], stats_dir=str(root / "stats"),
                corpus=f"samples:64+file:{corpus}", reference_corpus=f"file:{corpus}")


@pytest.fixture(scope="module")
def run(tiny_gpt2, facts, hp):
    """Two sequential batches of 4 edits on a copy of the tiny GPT-2, with snapshots in between."""
    base_model, tok = tiny_gpt2
    model = copy.deepcopy(base_model)
    reqs = requests(facts, 8)
    editor = get_editor("hook", **hp)
    fp = fingerprint(model)
    probe = torch.tensor([tok(reqs[0].text)["input_ids"]])
    with torch.no_grad():
        before = model(probe).logits
    r1 = editor.edit(model, tok, reqs[:4], None)
    with torch.no_grad():
        untouched = fingerprint(model) == fp and not installed_hooks(model) and torch.equal(model(probe).logits, before)
    r1.delta.apply(model)
    eff1 = [top1(model, tok, r.text, r.target_new) for r in reqs[:4]]
    r2 = editor.edit(model, tok, reqs[4:], r1.state)
    r2.delta.apply(model)
    return dict(model=model, base=base_model, tok=tok, reqs=reqs, r1=r1, r2=r2, eff1=eff1, untouched=untouched,
                fp=fp)


def test_edit_leaves_model_untouched_and_returns_a_hook_delta(run):
    assert run["untouched"]
    d = run["r1"].delta
    w = "transformer.h.0.mlp.c_proj.weight"
    assert d.kind == "hook" and d.weight_names == [w] and d.rank(w) == 4
    assert {f"{w}::alpha", f"{w}::ref_mean", f"{w}::ref_std"} <= set(d.extras)
    assert d.base_fingerprint == run["fp"] and d.request_ids == [r.request_id for r in run["reqs"][:4]]
    assert len(run["r1"].diagnostics) == 4


def test_edits_take_and_earlier_batch_survives(run):
    model, tok, reqs = run["model"], run["tok"], run["reqs"]
    assert sum(run["eff1"]) >= 3, run["eff1"]
    assert sum(d.succeeded for d in run["r1"].diagnostics) >= 3
    after = [top1(model, tok, r.text, r.target_new) for r in reqs[:4]]
    assert sum(after) >= sum(run["eff1"]) - 1, (run["eff1"], after)  # batch 2 keeps batch 1's edits
    assert sum(top1(model, tok, r.text, r.target_new) for r in reqs[4:]) >= 2
    hook = installed_hooks(model)["transformer.h.0.mlp.c_proj"]
    assert hook.rank == 8 and len(hook.segments) == 2
    # α only goes down; the state is fixed-size per layer
    a1 = float(run["r1"].delta.extras["transformer.h.0.mlp.c_proj.weight::alpha"])
    a2 = float(run["r2"].delta.extras["transformer.h.0.mlp.c_proj.weight::alpha"])
    assert a2 <= a1 <= 2.2 + 1e-9
    s1, s2 = run["r1"].state.tensors, run["r2"].state.tensors
    for k in ("C_accu", "ref_keys"):
        name = f"transformer.h.0.mlp.c_proj.weight::{k}"
        assert s1[name].shape == s2[name].shape
    assert not torch.equal(s1["transformer.h.0.mlp.c_proj.weight::C_accu"],
                           s2["transformer.h.0.mlp.c_proj.weight::C_accu"])


@torch.no_grad()
def test_unrelated_text_gets_base_logits_where_the_hook_does_not_fire(run):
    model, base, tok = run["model"], run["base"], run["tok"]
    hook = installed_hooks(model)["transformer.h.0.mlp.c_proj"]
    hook.context.record = True
    silent = 0
    try:
        for text in FILLER:
            ids = torch.tensor([tok(text)["input_ids"]])
            out = model(ids).logits[0]
            fired = hook.last_fired[0]
            ref = base(ids).logits[0]
            first = int(fired.nonzero()[0]) if fired.any() else ids.shape[1]
            assert torch.equal(out[:first], ref[:first])
            silent += int(not fired.any())
    finally:
        hook.context.record = False
    assert silent >= len(FILLER) // 2
    rate = hook_firing_rate(model, tok, FILLER)
    assert rate <= 0.15, rate
    assert hook_firing_rate(model, tok, [r.text for r in run["reqs"]]) > rate


@torch.no_grad()
def test_apply_remove_is_exact(run, tiny_gpt2):
    model, tok = run["model"], run["tok"]
    texts = [r.text for r in run["reqs"]] + FILLER
    enc = tok(texts, return_tensors="pt", padding=True)
    base_out = run["base"](**enc).logits
    edited = model(**enc).logits
    clone = copy.deepcopy(run["base"])
    run["r1"].delta.apply(clone)
    run["r2"].delta.apply(clone)
    assert torch.equal(clone(**enc).logits, edited)
    run["r2"].delta.remove(clone)
    run["r1"].delta.remove(clone)
    assert not installed_hooks(clone) and fingerprint(clone) == run["fp"]
    assert torch.equal(clone(**enc).logits, base_out)


@torch.no_grad()
def test_save_reload_and_generate(run, tmp_path):
    model, tok, reqs = run["model"], run["tok"], run["reqs"]
    model_dir, hooks_dir = tmp_path / "model", tmp_path / "hooks"
    run["base"].save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    save_hooks(model, hooks_dir)
    loaded = load_hooked(model_dir, hooks_dir)
    enc = tok([r.text for r in reqs] + FILLER, return_tensors="pt", padding=True)
    assert torch.equal(loaded.model(**enc).logits, model(**enc).logits)
    # the hooked model still generates; greedy first token = the edited top-1 answer where the edit took
    for r in reqs[:4]:
        ids = torch.tensor([tok(r.text)["input_ids"]])
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
        first = tok(" " + r.target_new, add_special_tokens=False)["input_ids"][0]
        assert (int(out[0, ids.shape[1]]) == first) == top1(model, tok, r.text, r.target_new)
    # the delta file round-trips with its gates
    path = tmp_path / "d1.safetensors"
    run["r1"].delta.save(path)
    back = LowRankDelta.load(path)
    assert back.kind == "hook" and set(back.extras) == set(run["r1"].delta.extras)


def test_llama_layout(tiny_llama, facts, hp):
    base, tok = tiny_llama
    model = copy.deepcopy(base)
    reqs = requests(facts, 4)
    res = get_editor("hook", **{**hp, "value_steps": 50}).edit(model, tok, reqs, None)
    assert res.delta.weight_names == ["model.layers.0.mlp.down_proj.weight"]
    assert not installed_hooks(model)
    res.delta.apply(model)
    assert sum(top1(model, tok, r.text, r.target_new) for r in reqs) >= 2
    res.delta.remove(model)
    ids = torch.tensor([tok(reqs[0].text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_bad_input_is_refused(tiny_gpt2, facts, hp):
    model, tok = tiny_gpt2
    editor = get_editor("hook", **hp)
    with pytest.raises(RequestError):
        editor.edit(model, tok, [DeletionRequest("d", "src", "bad", "good")], None)
    with pytest.raises(RequestError):
        editor.edit(model, tok, [], None)
    with pytest.raises(StateError):
        editor.edit(model, tok, requests(facts, 1), EditorState(editor="nse"))
    with pytest.raises(Exception, match="unknown hook-editor"):
        get_editor("hook", not_a_knob=1)

"""Gated hook layers: install/remove exactness, gating rule, padding, length-1 inputs, persistence.

Tiny GPT-2 (Conv1D) and Llama (Linear) models built from configs; deltas with random factors.
"""
from __future__ import annotations

import pytest
import torch

from editing.delta import LowRankDelta
from editing.editors.hook import apply_hook_delta, hooks_delta, load_hooks, save_hooks
from editing.editors.hook_module import HookLayer, Segment, forced_firing, installed_hooks
from editing.errors import DeltaError, FingerprintMismatchError
from editing.models import fingerprint


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), "transformer.h.{}.mlp.c_proj.weight", 32, 128


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), "model.layers.{}.mlp.down_proj.weight", 32, 64


MODELS = {"gpt2": _gpt2, "llama": _llama}


def _delta(template, d_out, d_in, layers=(1,), rank=2, alpha=1.5, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    factors, extras = {}, {}
    for layer in layers:
        w = template.format(layer)
        factors[w] = (torch.randn(d_out, rank, generator=g) * scale, torch.randn(d_in, rank, generator=g))
        extras[f"{w}::alpha"] = torch.tensor(alpha)
        extras[f"{w}::ref_mean"] = torch.tensor(0.5)
        extras[f"{w}::ref_std"] = torch.tensor(0.5)
    # the sequence z-score alone (the reference gate is tested on its own below)
    return LowRankDelta(factors, kind="hook", extras=extras, editor="hook", request_ids=[f"r{seed}"],
                        meta={"ref_gate": False})


@pytest.fixture(params=sorted(MODELS))
def tiny(request):
    return MODELS[request.param]()


def _ids(n=2, t=12, seed=3):
    return torch.randint(1, 97, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_apply_then_remove_is_exact_and_leaves_no_trace(tiny):
    model, tpl, d_out, d_in = tiny
    fp, ids = fingerprint(model), _ids()
    base = model(ids).logits
    modules_before = [n for n, _ in model.named_modules()]
    d1, d2 = _delta(tpl, d_out, d_in, layers=(0, 1), seed=1), _delta(tpl, d_out, d_in, layers=(1,), seed=2)
    d1.apply(model)
    after1 = model(ids).logits
    d2.apply(model)
    assert installed_hooks(model)[tpl.format(1)[:-7]].rank == 4
    assert not torch.equal(model(ids).logits, base)
    assert fingerprint(model) == fp  # hooks live in non-persistent buffers: base weights untouched
    d2.remove(model)
    assert torch.equal(model(ids).logits, after1)
    d1.remove(model)
    assert installed_hooks(model) == {}
    assert [n for n, _ in model.named_modules()] == modules_before
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(model(ids).logits, base)
    with pytest.raises(DeltaError):
        d1.remove(model)


@torch.no_grad()
def test_forced_firing_equals_dense_weight_delta(tiny):
    """With every position firing, the hook is exactly W0 + U Vᵀ (Conv1D and Linear layouts)."""
    model, tpl, d_out, d_in = tiny
    ids = _ids()
    d = _delta(tpl, d_out, d_in, layers=(0, 1), scale=0.05)
    d.apply(model)
    with forced_firing(model):
        hooked = model(ids).logits
    d.remove(model)
    weight_delta = LowRankDelta(d.factors, kind="weight")
    weight_delta.apply(model)
    dense = model(ids).logits
    weight_delta.remove(model)
    torch.testing.assert_close(hooked, dense, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_positions_before_the_first_firing_token_are_bit_exact(tiny):
    model, tpl, d_out, d_in = tiny
    ids = _ids(n=4, t=16)
    base = model(ids).logits
    apply_hook_delta(model, _delta(tpl, d_out, d_in, alpha=1.5))
    hs = next(iter(installed_hooks(model).values())).context
    hs.record = True
    out = model(ids).logits
    fired = next(iter(installed_hooks(model).values())).last_fired
    assert fired.any() and not fired.all()
    for b in range(ids.shape[0]):
        first = int(fired[b].nonzero()[0]) if fired[b].any() else ids.shape[1]
        assert torch.equal(out[b, :first], base[b, :first])
    # a gate no token passes: every logit is the base model's, bit for bit
    layer = next(iter(installed_hooks(model).values()))
    layer.segments[-1].alpha = 1e9
    assert torch.equal(model(ids).logits, base)


def test_zscore_is_leave_one_out_pooled_with_reference():
    layer = HookLayer(3, 2, n0=2.0)
    layer.push(Segment(torch.ones(2, 1), torch.ones(3, 1), alpha=2.0, ref_mean=1.0, ref_std=0.5))
    g = torch.Generator().manual_seed(0)
    d = torch.rand(3, 7, generator=g) * 3
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, 5:] = False
    z = layer.zscores(d, valid)
    for b in range(3):
        idx = valid[b].nonzero().flatten().tolist()
        for t in idx:
            others = [float(d[b, s]) for s in idx if s != t]
            n = len(others) + 2.0
            mean = (sum(others) + 2.0 * 1.0) / n
            var = (sum(x * x for x in others) + 2.0 * (0.25 + 1.0)) / n - mean ** 2
            assert float(z[b, t]) == pytest.approx((float(d[b, t]) - mean) / var ** 0.5, rel=1e-4)


def test_reference_gate_needs_an_outlier_against_general_text_too():
    layer = HookLayer(1, 1, n0=0.0, ref_gate=True)
    layer.push(Segment(torch.ones(1, 1), torch.ones(1, 1), alpha=2.0, ref_mean=10.0, ref_std=1.0))
    x = torch.tensor([[[1.0], [1.0], [1.0], [1.0], [1.0], [1.0], [5.0]]])  # an outlier in its sequence only
    assert not layer.gate(x)[1].any()
    layer.ref_gate = False
    assert layer.gate(x)[1].tolist() == [[False] * 6 + [True]]
    layer.ref_gate = True
    x[0, -1, 0] = 13.0  # now also ≥ μ_ref + α σ_ref
    assert layer.gate(x)[1].tolist() == [[False] * 6 + [True]]


def test_single_token_uses_reference_scale():
    layer = HookLayer(3, 2, n0=4.0)
    layer.push(Segment(torch.eye(2, 1), torch.tensor([[1.0], [0.0], [0.0]]), alpha=2.0, ref_mean=1.0, ref_std=0.5))
    x = torch.tensor([[[1.9, 0.0, 0.0]], [[2.1, 0.0, 0.0]]])  # deviation norms 1.9 and 2.1: z = 1.8 and 2.2
    _, fire, _ = layer.gate(x)
    assert fire.tolist() == [[False], [True]]


@torch.no_grad()
def test_right_padding_gives_the_same_gates_and_logits_as_unpadded(tiny):
    model, tpl, d_out, d_in = tiny
    apply_hook_delta(model, _delta(tpl, d_out, d_in, alpha=1.5))
    layer = next(iter(installed_hooks(model).values()))
    layer.context.record = True
    a, b = _ids(1, 14, seed=5), _ids(1, 8, seed=6)
    outs, fires = [], []
    for x in (a, b):
        outs.append(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0])
        fires.append(layer.last_fired[0].clone())
    batch = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, :8], mask[1, :8] = b[0], 1
    out = model(input_ids=batch, attention_mask=mask).logits
    assert torch.equal(layer.last_fired[0], fires[0]) and torch.equal(layer.last_fired[1, :8], fires[1])
    assert not layer.last_fired[1, 8:].any()
    torch.testing.assert_close(out[0], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1, :8], outs[1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_generate_works_and_equals_base_when_gate_is_closed(tiny):
    model, tpl, d_out, d_in = tiny
    ids = _ids(1, 5)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    base = model.generate(ids, **kw)
    apply_hook_delta(model, _delta(tpl, d_out, d_in, alpha=1e9))
    assert torch.equal(model.generate(ids, **kw), base)
    installed_hooks(model)[tpl.format(1)[:-7]].segments[-1].alpha = -1e9  # fire everywhere
    assert model.generate(ids, **kw).shape == base.shape


@torch.no_grad()
def test_save_and_reload_gives_identical_logits(tiny, tmp_path):
    model, tpl, d_out, d_in = tiny
    ids = _ids()
    _delta(tpl, d_out, d_in, layers=(0, 1), seed=1).apply(model)
    _delta(tpl, d_out, d_in, layers=(1,), seed=2, alpha=1.2).apply(model)
    want = model(ids).logits
    save_hooks(model, tmp_path)
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    load_hooks(fresh, tmp_path)
    assert torch.equal(fresh(ids).logits, want)
    # segments survive: the second batch can still be removed exactly
    d2 = _delta(tpl, d_out, d_in, layers=(1,), seed=2, alpha=1.2)
    d2.remove(fresh)
    d2.remove(model)
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    # a different base model is refused
    other = type(model)(model.config).eval()
    with pytest.raises(FingerprintMismatchError):
        load_hooks(other, tmp_path)


def test_hooks_delta_roundtrip_keeps_gates(tiny):
    model, tpl, d_out, d_in = tiny
    _delta(tpl, d_out, d_in, alpha=1.7).apply(model)
    d = hooks_delta(model)
    w = tpl.format(1)
    assert float(d.extras[f"{w}::alpha"]) == pytest.approx(1.7)
    assert d.meta["segments"][w] == [2]


def test_wrong_shape_is_refused_and_model_left_clean(tiny):
    model, tpl, d_out, d_in = tiny
    bad = _delta(tpl, d_out + 1, d_in)
    with pytest.raises(DeltaError):
        bad.apply(model)
    assert installed_hooks(model) == {}

"""LowRankDelta: exact apply/remove, compose, compact, persistence and integrity checks."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from editing.arch import get_module, spec_for, weight_view
from editing.delta import LowRankDelta
from editing.errors import DeltaError, FingerprintMismatchError, IntegrityError
from editing.models import fingerprint


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _random_delta(model, rank=3, seed=1, fp=""):
    g = torch.Generator().manual_seed(seed)
    spec = spec_for(model)
    factors = {}
    for layer in range(2):
        name = spec.mlp_out_name(layer)
        d_out, d_in = weight_view(get_module(model, name)).shape
        factors[name + ".weight"] = (torch.randn(d_out, rank, generator=g), torch.randn(d_in, rank, generator=g))
    return LowRankDelta(factors, base_fingerprint=fp, editor="test", hyperparameters={"lam": 1.0},
                        request_ids=["r1", "r2"])


def _read(path):
    """The raw metadata and tensors of a safetensors file (to tamper with them)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2-conv1d", "llama-linear"])
def test_apply_then_remove_restores_weights_and_changes_logits(make):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    logits0 = model(ids).logits
    delta = _random_delta(model)
    delta.apply(model)
    name = next(iter(delta.factors))
    w = weight_view(get_module(model, name[: -len(".weight")]))
    w0 = before[name].t() if type(get_module(model, name[:-7])).__name__ == "Conv1D" else before[name]
    torch.testing.assert_close(w.detach().double() - w0.double(), delta.dense(name), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(model(ids).logits, logits0)
    delta.remove(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=0)


def test_compose_and_compact_keep_the_sum():
    model = _gpt2()
    a, b = _random_delta(model, seed=1), _random_delta(model, seed=2)
    both = a.compose(b)
    name = next(iter(a.factors))
    assert both.rank(name) == 6
    torch.testing.assert_close(both.dense(name), a.dense(name) + b.dense(name))
    exact = both.compact()
    assert exact.rank(name) == 6
    torch.testing.assert_close(exact.dense(name), both.dense(name), atol=1e-4, rtol=1e-5)
    truncated = both.compact(rank=2)
    assert truncated.rank(name) == 2
    # truncated SVD is the best rank-2 approximation: its error equals the tail singular values
    s = torch.linalg.svdvals(both.dense(name))
    err = torch.linalg.matrix_norm(truncated.dense(name) - both.dense(name))
    assert float(err) == pytest.approx(float(s[2:].norm()), rel=1e-4)


def test_norms_match_dense_frobenius():
    model = _llama()
    d = _random_delta(model)
    for name, n in d.norms().items():
        assert n == pytest.approx(float(torch.linalg.matrix_norm(d.dense(name))), rel=1e-9)


def test_save_load_roundtrip_and_metadata(tmp_path):
    model = _llama()
    fp = fingerprint(model)
    d = _random_delta(model, fp=fp)
    sha = d.save(tmp_path / "d.safetensors")
    loaded = LowRankDelta.load(tmp_path / "d.safetensors", expect_fingerprint=fp)
    assert loaded.request_ids == ["r1", "r2"] and loaded.editor == "test" and loaded.hyperparameters == {"lam": 1.0}
    for name in d.factors:
        assert torch.equal(loaded.factors[name][0], d.factors[name][0])
    assert len(sha) == 64


def test_tampered_tensor_is_refused(tmp_path):
    from safetensors.torch import save_file

    d = _random_delta(_gpt2())
    path = tmp_path / "d.safetensors"
    d.save(path)
    meta, tensors = _read(path)
    key = next(iter(tensors))
    tensors[key][0, 0] += 1.0
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(IntegrityError, match="does not match"):
        LowRankDelta.load(path)


def test_tampered_metadata_and_corrupt_file_are_refused(tmp_path):
    from safetensors.torch import save_file

    d = _random_delta(_gpt2())
    path = tmp_path / "d.safetensors"
    d.save(path)
    meta, tensors = _read(path)
    header = json.loads(meta["editops"])
    header["request_ids"] = ["someone-else"]
    save_file(tensors, str(path), metadata={"editops": json.dumps(header)})
    with pytest.raises(IntegrityError):
        LowRankDelta.load(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DeltaError, match="not a readable"):
        LowRankDelta.load(path)
    with pytest.raises(DeltaError, match="does not exist"):
        LowRankDelta.load(tmp_path / "missing.safetensors")


def test_delta_for_another_base_is_refused(tmp_path):
    model, other = _gpt2(), _llama()
    d = _random_delta(model, fp=fingerprint(model))
    d.save(tmp_path / "d.safetensors")
    with pytest.raises(FingerprintMismatchError, match="different|not"):
        LowRankDelta.load(tmp_path / "d.safetensors", expect_fingerprint=fingerprint(other))


def test_shape_mismatch_is_refused():
    model = _gpt2()
    name = spec_for(model).mlp_out_name(0) + ".weight"
    bad = LowRankDelta({name: (torch.randn(7, 1), torch.randn(5, 1))})
    with pytest.raises(DeltaError, match="weight is"):
        bad.apply(model)
    with pytest.raises(DeltaError, match="factors must be"):
        LowRankDelta({name: (torch.randn(7, 2), torch.randn(5, 1))})

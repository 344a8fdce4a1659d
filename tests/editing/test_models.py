"""editing.models.load: clear errors for bad sources, and a saved tiny model round-trips."""
from __future__ import annotations

import pytest
import torch

from editing.errors import GGUFError, ModelLoadError
from editing.models import fingerprint, load, resolve_device


def test_missing_path_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "no" / "such" / "model")


def test_offline_hub_id_is_a_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE|hub id"):
        load("editops-test/no-such-model-anywhere")


def test_directory_without_weights_is_a_model_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        load(tmp_path)


def test_missing_gguf_file_is_a_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="does not exist"):
        load(tmp_path, gguf_file="model.gguf")


def test_loads_a_saved_tiny_model_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    from editing.training.causal import build_tokenizer, gpt2_config

    texts = ["the cat sat on the mat", "a dog ran in the park", "the sun rose over the hills"]
    tok = build_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gpt2_config(tok, n_layer=1, n_embd=32, n_head=2)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))

    loaded = load(tmp_path)
    assert loaded.kind == "causal" and loaded.spec.model_type == "gpt2"
    assert loaded.fingerprint == fingerprint(model)
    assert loaded.tokenizer(texts[0])["input_ids"] == tok(texts[0])["input_ids"]
    ids = torch.tensor([tok(texts[1])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


def test_device_names_resolve_or_fail_with_what_to_use():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(ModelLoadError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")   # one past the last device there is


def test_fingerprint_changes_with_one_weight():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    before = fingerprint(model)
    assert fingerprint(model) == before
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight[0, 0] += 1e-3
    assert fingerprint(model) != before


def test_an_edit_hashes_the_base_weights_once(monkeypatch, tmp_path):
    """The fingerprint of a loaded model is computed once, however many callers ask (the CLI for the delta's
    base, the editor for its statistics and context prefixes): hashing reads every weight."""
    import editing.models as models
    from editing.arch import spec_for
    from editing.editors import get_editor
    from editing.models import LoadedModel
    from tinyworld import FILLER, build, requests, world

    facts = world(0)
    model, tok = build("gpt2", 1, facts, steps=5)
    import hashlib
    from types import SimpleNamespace

    calls = []   # every fingerprint, wherever it is imported, hashes with editing.models' hashlib
    monkeypatch.setattr(models, "hashlib", SimpleNamespace(sha256=lambda: calls.append(1) or hashlib.sha256()))
    loaded = LoadedModel(model=model, tokenizer=tok, spec=spec_for(model), source="memory", kind="causal")
    fp = loaded.fingerprint
    (tmp_path / "filler.txt").write_text("\n".join(FILLER) + "\n")
    res = get_editor("nse", layers=[0], locus="subject", lam=30.0, siblings=0, corpus=f"file:{tmp_path / 'filler.txt'}",
                     stats_dir=str(tmp_path), value={"steps": 2}).edit(model, tok, requests(facts, 2), None)
    assert res.delta.base_fingerprint == fp == loaded.fingerprint
    assert len(calls) == 1

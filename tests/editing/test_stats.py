"""Key statistics: the streamed second moment equals the dense one, masks are honoured, the cache is reused."""
from __future__ import annotations

import torch

from editing.arch import spec_for, weight_view, get_module
from editing.stats import accumulate_key_moment, accumulate_key_moments, corpus_moments, key_moment, text_batches
from tinyworld import FILLER, facts, tiny_gpt2, tiny_llama  # noqa: F401  (fixtures)


def _all_keys(model, name, batches):
    keys = []
    h = get_module(model, name).register_forward_pre_hook(lambda m, a: keys.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    ks = [k[b["attention_mask"].bool()] for k, b in zip(keys, batches)]
    return torch.cat(ks).double()


def test_streamed_moment_equals_dense_and_skips_padding(tiny_gpt2):
    model, tok = tiny_gpt2
    spec = spec_for(model)
    name = spec.mlp_out_name(1)
    batches = text_batches(tok, FILLER, batch_size=4)  # uneven lengths: padding present
    assert any(int(b["attention_mask"].min()) == 0 for b in batches)
    km = accumulate_key_moment(model, name, batches, progress=False)
    k = _all_keys(model, name, batches)
    assert km.count == k.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert torch.allclose(km.moment.double(), k.T @ k / k.shape[0], atol=1e-5)
    assert km.moment.dtype == torch.float32 and km.moment.shape == (weight_view(get_module(model, name)).shape[1],) * 2
    # several modules in one pass give the same result per module
    both = accumulate_key_moments(model, [spec.mlp_out_name(0), name], batches, progress=False)
    assert torch.allclose(both[name].moment, km.moment)


def test_key_moment_is_cached_by_fingerprint_module_and_corpus(tiny_llama, tmp_path):
    model, tok = tiny_llama
    spec = spec_for(model)
    c1 = key_moment(model, tok, spec, 2, FILLER, "filler", tmp_path, "f" * 64, progress=False)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1 and "model.layers.2.mlp.down_proj" in files[0].name
    mtime = files[0].stat().st_mtime_ns
    c2 = key_moment(model, tok, spec, 2, FILLER, "filler", tmp_path, "f" * 64, progress=False)
    assert torch.equal(c1, c2) and files[0].stat().st_mtime_ns == mtime  # reused, not recomputed
    key_moment(model, tok, spec, 2, FILLER[:3], "filler", tmp_path, "f" * 64, progress=False)  # other corpus
    key_moment(model, tok, spec, 2, FILLER, "filler", tmp_path, "e" * 64, progress=False)  # other base model
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    evals = torch.linalg.eigvalsh(c1.double())
    assert float(evals.min()) > -1e-5  # a second moment is positive semidefinite


def test_corpus_of_model_samples_is_built_once(tiny_gpt2, tmp_path):
    model, tok = tiny_gpt2
    spec = spec_for(model)
    a = corpus_moments(model, tok, spec, [0, 2], "samples:8", tmp_path, "a" * 64, progress=False)
    b = corpus_moments(model, tok, spec, [0, 2], "samples:8", tmp_path, "a" * 64, progress=False)
    assert set(a) == {0, 2} and all(torch.equal(a[l], b[l]) for l in a)
    assert float(a[2].trace()) > 0


def test_corpus_texts_longer_than_the_context_are_truncated(tmp_path):
    """A corpus of long texts (e.g. ``stdlib``) on a model with a short context: truncated, not an IndexError."""
    from transformers import GPT2LMHeadModel

    from editing.training.causal import build_tokenizer, gpt2_config

    texts = [" ".join(FILLER) * 3] * 4  # each far longer than 16 tokens
    tok = build_tokenizer(texts, vocab_size=300)
    model = GPT2LMHeadModel(gpt2_config(tok, n_layer=1, n_embd=32, n_head=2, n_positions=16)).eval()
    c0 = key_moment(model, tok, spec_for(model), 0, texts, "long", tmp_path, "c" * 64, progress=False)
    assert c0.shape == (128, 128) and float(c0.trace()) > 0


def test_stats_command_with_corpus_auto_computes_what_an_edit_uses(tmp_path):
    """``python -m editing.stats --corpus auto`` (the DVC stage's call) writes the file of the corpus an edit of
    that model would use, named by that corpus."""
    import json

    from transformers import GPT2LMHeadModel

    from editing.editors.presets import corpus_for
    from editing.models import load
    from editing.stats import main
    from editing.training.causal import build_tokenizer, gpt2_config

    tok = build_tokenizer([" ".join(FILLER)] * 4, vocab_size=300)
    model = GPT2LMHeadModel(gpt2_config(tok, n_layer=1, n_embd=16, n_head=2, n_positions=16)).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    expected = corpus_for(load(str(tmp_path / "m")).model)
    assert expected.startswith("samples:")
    main(["--model", str(tmp_path / "m"), "--layers", "0", "--out", str(tmp_path / "stats"),
          "--summary", str(tmp_path / "summary.json")])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["corpus"] == expected
    files = list((tmp_path / "stats").rglob("*.safetensors"))
    assert len(files) == 1 and expected.replace(":", "-") in files[0].name

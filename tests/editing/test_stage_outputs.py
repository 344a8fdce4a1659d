"""DVC stages write the same bytes on every run: no timings in their outputs, training on a fixed thread count.

`dvc repro` in a fresh clone then leaves `dvc.lock` as committed, which is what makes the project's models
reproducible in DVC's sense (a wall time in a model directory or a metrics file changed its hash every run).
"""
from __future__ import annotations

from pathlib import Path

import torch


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fact_model_stage_writes_the_same_bytes_twice(tmp_path):
    from editing.training.causal import build_fact_model

    for run in ("a", "b"):
        build_fact_model(tmp_path / run, n_entities=8, n_relations=2, n_layer=1, n_embd=32, n_head=2, n_inner=64,
                         vocab_size=300, steps=3, batch_size=4, n_filler=10)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {"model/model.safetensors", "model/editops_source.json", "metrics.json", "requests.jsonl"} <= set(a)
    assert a == b


def test_translator_stage_writes_the_same_bytes_twice(tmp_path):
    from editing.training.seq2seq import build_translation_model

    threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            build_translation_model(tmp_path / run / "model", tmp_path / run / "data", tmp_path / run / "req.jsonl",
                                    size="tiny", epochs=1, log_every=0)
    finally:
        torch.set_num_threads(threads)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {"model/model.safetensors", "model/editops_train_metrics.json", "req.jsonl"} <= set(a)
    assert a == b


def test_model_dirs_are_the_same_bytes_under_another_transformers_release(tmp_path, monkeypatch):
    """A fresh venv with the next patch release of transformers must not change a stage's model directory
    (it used to: ``save_pretrained`` stamps the release into config.json and generation_config.json)."""
    import transformers.configuration_utils as config_utils
    import transformers.generation.configuration_utils as generation_utils
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from editing.model_dir import VERSION_STAMP, save_model_dir
    from editing.models import fingerprint
    from editing.training.seq2seq import build_word_tokenizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=40))
    tokenizer = build_word_tokenizer(["a", "b"])
    save_model_dir(model, tokenizer, tmp_path / "this")
    for module in (config_utils, generation_utils):
        monkeypatch.setattr(module, "__version__", "99.0.0")
    save_model_dir(model, tokenizer, tmp_path / "next")
    model.save_pretrained(tmp_path / "plain")
    assert '"99.0.0"' in (tmp_path / "plain" / "config.json").read_text()   # the stamp the helper removes
    this, following = _files(tmp_path / "this"), _files(tmp_path / "next")
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(this)
    assert this == following
    assert all(VERSION_STAMP.encode() not in this[name] for name in ("config.json", "generation_config.json"))
    assert fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "next")) == fingerprint(model)

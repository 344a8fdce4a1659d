"""`editops eval` / `editops edit` end to end on tiny models saved as real HF directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from editing.formats import write_requests
from editing.requests import FactRequest, Probe

TEXTS = ["The capital of France is Paris.", "The capital of Spain is Madrid.", "Rome is the capital of Italy.",
         "Alice plays the violin and Bob plays the piano.", "The weather was mild and the roads were quiet."] * 4


@pytest.fixture(scope="module")
def cli():
    from flows.cli import _register
    from flows.cli.app import app

    _register()
    return CliRunner(), app


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    """A random tiny GPT-2 + BPE tokenizer saved as safetensors, and a fact request file for it."""
    from transformers import GPT2LMHeadModel

    from editing.training.causal import build_tokenizer, gpt2_config

    root = tmp_path_factory.mktemp("cli")
    tok = build_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tok, n_layer=2, n_embd=32, n_head=2))
    model.save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    reqs = [FactRequest(f"r{i}", p, s, new, true, paraphrases=(para,), neighbours=(Probe(nb, nb_t),))
            for i, (p, s, new, true, para, nb, nb_t) in enumerate([
                ("The capital of {} is", "France", "Madrid", "Paris", "France's capital is", "The capital of Spain is", "Madrid"),
                ("{} plays the", "Alice", "piano", "violin", "Alice performs on the", "Bob plays the", "piano"),
            ])]
    write_requests(root / "requests.jsonl", reqs)
    (root / "heldout.txt").write_text("\n".join(TEXTS[:5]) + "\n")
    return root


def test_eval_prints_counterfact_table_and_json(cli, random_model_dir, tmp_path):
    runner, app = cli
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["eval", "--model", str(random_model_dir / "model"), "--requests",
                              str(random_model_dir / "requests.jsonl"), "--heldout", str(random_model_dir / "heldout.txt"),
                              "--json", str(out), "--fluency", "1"])
    assert res.exit_code == 0, res.output
    for name in ("efficacy", "paraphrase", "neighbourhood", "perplexity", "fluency"):
        assert name in res.output
    data = json.loads(out.read_text())
    assert data["n_requests"] == 2 and 0.0 <= data["efficacy"] <= 1.0 and data["perplexity"] > 1.0


def test_eval_against_base_caches_base_outputs(cli, random_model_dir, tmp_path):
    runner, app = cli
    cache = tmp_path / "cache"
    args = ["eval", "--model", str(random_model_dir / "model"), "--requests", str(random_model_dir / "requests.jsonl"),
            "--base", str(random_model_dir / "model"), "--cache-dir", str(cache), "--json", str(tmp_path / "m.json"),
            "--heldout", str(random_model_dir / "heldout.txt")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    (cached,) = cache.glob("*.json")
    data = json.loads((tmp_path / "m.json").read_text())
    # the model is its own base: identical argmax tokens, no perplexity drift
    assert data["locality"] == 1.0 and abs(data["perplexity_drift"]) < 1e-6
    mtime = cached.stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert cached.stat().st_mtime_ns == mtime  # second run reuses the cache unchanged


def test_cli_errors_are_one_red_line(random_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"requested_rewrite": {"prompt": "{} is", "subject": "x"}}) + "\n")
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "eval", "--model",
                           str(random_model_dir / "model"), "--requests", str(bad)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "record 1" in proc.stderr and "misses field 'requested_rewrite.target_true'" in proc.stderr
    assert "Traceback" not in proc.stderr

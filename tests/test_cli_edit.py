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


def test_eval_heldout_samples_come_from_the_base(cli, random_model_dir, tmp_path):
    """``--heldout samples:N`` samples the held-out text from ``--base`` (the unedited model); without a base
    the command stops with a typed error that names the fix (`main` prints it as one line)."""
    from editing.errors import EditopsError

    runner, app = cli
    model, reqs = str(random_model_dir / "model"), str(random_model_dir / "requests.jsonl")
    res = runner.invoke(app, ["eval", "--model", model, "--requests", reqs, "--base", model, "--heldout", "samples:4",
                              "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["perplexity"] > 1.0 and abs(data["perplexity_drift"]) < 1e-6   # the model is its own base
    res = runner.invoke(app, ["eval", "--model", model, "--requests", reqs, "--heldout", "samples:4"])
    assert res.exit_code != 0 and isinstance(res.exception, EditopsError) and "--base" in str(res.exception)


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


def test_a_device_that_is_not_there_is_one_red_line(random_model_dir, tmp_path):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text(json.dumps({"prompt": "{} lives in", "subject": "Ann", "target_new": "Oslo"}) + "\n")
    proc = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "eval", "--model",
                           str(random_model_dir / "model"), "--requests", str(reqs), "--device", "cuda:99"],
                          capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "device 'cuda:99'" in proc.stderr and "--device cpu" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("editor", ["nse", "hook"])
def test_edit_writes_hf_dir_deltas_state_and_summary(cli, tiny_fact_model, tmp_path, editor):
    """`editops edit` on the tiny fact model: a loadable HF dir, one sha256-checked delta per batch, the
    editor state, a summary with per-request diagnostics, and `editops eval` comparing with the saved base."""
    from transformers import AutoModelForCausalLM

    from editing.delta import LowRankDelta
    from editing.editors.base import EditorState

    runner, app = cli
    out = tmp_path / "edited"
    res = runner.invoke(app, ["edit", "--model", str(tiny_fact_model.model_dir), "--requests",
                              str(tiny_fact_model.requests_path), "--editor", editor, "--batch-size", "2",
                              "--limit", "4", "--out", str(out), "--heldout", str(tiny_fact_model.heldout_path),
                              "--set", f"stats_dir={tmp_path / 'stats'}", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "2 batches of 2" in res.output and "efficacy" in res.output
    if editor == "nse":   # the measured choice is shown with the batches
        assert "locus" in res.output and "choice measured" in res.output.replace("\n", " ")
    summary = json.loads((out / "edit_summary.json").read_text())
    assert summary["n_requests"] == 4 and summary["editor"] == editor
    assert [d["request_id"] for d in summary["diagnostics"]] == [json.loads(line)["request_id"] for line in
                                                                 tiny_fact_model.requests_path.read_text().splitlines()[:4]]
    n_failed = sum(not d["succeeded"] for d in summary["diagnostics"])
    assert ("did not take" in res.output) == (n_failed > 0)
    assert summary["metrics"]["n_requests"] == 4 and summary["base_metrics"]["n_requests"] == 4
    deltas = sorted((out / "deltas").glob("batch-*.safetensors"))
    assert [d.name for d in deltas] == ["batch-0001.safetensors", "batch-0002.safetensors"]
    d1 = LowRankDelta.load(deltas[0])
    assert d1.base_fingerprint == summary["base_fingerprint"] and len(d1.request_ids) == 2
    assert EditorState.load(out / "editor_state.safetensors").editor == editor
    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)  # a plain HF directory

    res = runner.invoke(app, ["eval", "--model", str(out), "--requests", str(tiny_fact_model.requests_path),
                              "--limit", "4", "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert "base_outputs.json (written by editops edit)" in res.output.replace("\n", "")
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["efficacy"] == pytest.approx(summary["metrics"]["efficacy"])
    assert again["locality"] == pytest.approx(summary["metrics"]["locality"])


def test_eval_deletion_requests_use_deletion_metrics(cli, random_model_dir, tmp_path):
    """Deletion records go to the deletion metrics (a causal LM can have behaviours deleted too)."""
    runner, app = cli
    from editing.requests import DeletionRequest, TranslationProbe

    reqs = [DeletionRequest("d1", "The capital of France is", "Madrid", "Paris",
                            generalization=(TranslationProbe("The capital of Spain is", unwanted="Madrid"),),
                            locality=(TranslationProbe("Alice plays the", "violin"),))]
    path = tmp_path / "del.jsonl"
    write_requests(path, reqs)
    res = runner.invoke(app, ["eval", "--model", str(random_model_dir / "model"), "--requests", str(path),
                              "--base", str(random_model_dir / "model"), "--json", str(tmp_path / "d.json")])
    assert res.exit_code == 0, res.output
    assert "instance_gone" in res.output and "locality_exact" in res.output
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["n_requests"] == 1 and data["locality_exact"] == 1.0  # the model is its own base


@pytest.mark.slow
def test_edit_deletion_kind_end_to_end(cli, tiny_fact_model, tmp_path):
    """`editops edit --kind deletion` (rank-one editor on a causal LM): the model's own greedy output for a
    prompt is deleted; deletion metrics are printed, and `editops eval` reuses the saved base outputs."""
    from editing.formats import read_requests
    from editing.metrics.deletion import generate_outputs
    from editing.models import load
    from editing.requests import DeletionRequest, TranslationProbe

    runner, app = cli
    fact = read_requests(tiny_fact_model.requests_path, limit=1)[0]
    loaded = load(tiny_fact_model.model_dir)
    (said,) = generate_outputs(loaded.model, loaded.tokenizer, [fact.text])
    unwanted = said.strip()  # the whole greedy output
    positive = fact.target_new if fact.target_new != unwanted else fact.target_true
    req = DeletionRequest("del-0", fact.text, unwanted, positive,
                          locality=tuple(TranslationProbe(p.prompt, p.target) for p in fact.neighbours[:3]))
    path = tmp_path / "del.jsonl"
    write_requests(path, [req])
    out = tmp_path / "deleted"
    res = runner.invoke(app, ["edit", "--model", str(tiny_fact_model.model_dir), "--requests", str(path),
                              "--kind", "deletion", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "rank-one" in res.output and "instance_gone" in res.output
    summary = json.loads((out / "edit_summary.json").read_text())
    assert summary["kind"] == "deletion" and summary["editor"] == "rank-one"
    assert set(summary["metrics"]) >= {"instance_gone", "locality_exact"}
    res = runner.invoke(app, ["eval", "--model", str(out), "--requests", str(path)])
    assert res.exit_code == 0, res.output
    assert "written by editops edit" in res.output.replace("\n", " ")


def test_option_parsing_errors():
    from editing.errors import EditopsError
    from flows.cli.edit_cmd import check_kind, parse_layers, parse_settings

    assert parse_layers("1,3-5") == [1, 3, 4, 5] and parse_layers(None) is None
    assert parse_settings(["lam=2e4", "corpus=stdlib", "layers=[1,2]"]) == {"lam": 2e4, "corpus": "stdlib", "layers": [1, 2]}
    with pytest.raises(EditopsError, match="--layers"):
        parse_layers("a-b")
    with pytest.raises(EditopsError, match="key=value"):
        parse_settings(["lam"])
    with pytest.raises(EditopsError, match="'fact' or 'deletion'"):
        check_kind("facts")


def test_failure_reasons_print_each_distinct_message_once_most_frequent_first():
    """Under the red "did not take" line, ``editops edit`` prints the editor's reasons: each distinct message of
    the failed requests once, with its count, most frequent first, at most ``most`` of them."""
    from editing.editors.base import RequestDiagnostics
    from flows.cli.edit_cmd import failure_reasons

    sink = "edit did not take: subject 'France' is the prompt's first token (no BOS token), …"
    plain = "edit did not take: target_new is not the top prediction"
    failed = [RequestDiagnostics(request_id=f"r{i}", succeeded=False, message=m)
              for i, m in enumerate([plain, sink, plain, "", plain])]
    assert failure_reasons(failed) == [f"3 × {plain}", f"1 × {sink}"]
    assert failure_reasons(failed, most=1) == [f"3 × {plain}"]
    assert failure_reasons([]) == []


def test_edit_hold_relations_holds_every_prompt_of_the_request_file(cli, random_model_dir, tmp_path):
    """``--hold-relations`` (the default where it applies): where the editor holds other prompts, the request file's
    prompts become ``relation_prompts`` (recorded with the run); without ``other_prompts`` nothing would hold them:
    by default none are given, and asked for explicitly the command says so; ``--no-hold-relations`` leaves them
    out."""
    from editing.errors import HyperparameterError

    runner, app = cli
    reqs = random_model_dir / "requests.jsonl"
    args = ["edit", "--model", str(random_model_dir / "model"), "--requests", str(reqs), "--editor", "nse",
            "--no-eval", "--no-progress", "--device", "cpu", "--layers", "0",
            "--set", "lam=30", "--set", "corpus=samples:8", "--set", "siblings=0", "--set", f"stats_dir={tmp_path}"]

    def recorded(*extra: str) -> dict:
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        res = runner.invoke(app, [*args, *extra, "--out", str(out)])
        assert res.exit_code == 0, res.output
        return json.loads((out / "edit_summary.json").read_text())["hyperparameters"]

    held = recorded("--set", "other_prompts=2")
    assert held["other_prompts"] == 2
    assert held["relation_prompts"] == {"The capital of {} is": None, "{} plays the": None}
    assert recorded("--set", "other_prompts=2", "--no-hold-relations")["relation_prompts"] is None
    plain = recorded()
    assert plain["other_prompts"] == 0 and plain["relation_prompts"] is None
    res = runner.invoke(app, [*args, "--hold-relations", "--out", str(tmp_path / "none")])
    assert isinstance(res.exception, HyperparameterError) and "other_prompts" in str(res.exception)

"""Versions with their gate figures and diffs: what the pipeline measured, read back from the registry.

Real sqlite MLflow, the tiny GPT-2 edited by the real pipeline (local engine), the real CLI in-process.
Every figure checked here is compared with a second, independent record of the same measurement
(the ledger's per-ticket gate results, the version run's MLflow metrics, the registered delta's norms).
"""
from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from flowkit import FAST_NSE, OPEN_GATES, fact_tickets, make_project
from flows.ledger import Ledger


@pytest.fixture(params=["file", "samples:4"])
def edited_line(request, tmp_path, tiny_model_dir):
    """Two fact tickets, one per batch, through the pipeline: versions 2 and 3 of ``facts``; the perplexity
    gate reads a held-out file, or texts the line's base model samples itself (``samples:4``)."""
    from tinyworld import FILLER

    from flows.pipeline import open_registry, run_once

    model_dir, reqs = tiny_model_dir
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(FILLER) + "\n")
    cfg = make_project(tmp_path / "proj", base_model=str(model_dir), batch_size=1, promotion="auto",
                       hyperparameters={**FAST_NSE, "stats_dir": str(tmp_path / "stats")}, gates=OPEN_GATES,
                       heldout=str(heldout) if request.param == "file" else request.param)
    (cfg.inbox / "t.json").write_text(json.dumps(fact_tickets(reqs[:2])))
    report = run_once(cfg, engine="local", say=lambda *_: None)
    return cfg, open_registry(cfg), [r.request_id for r in reqs[:2]], report


@pytest.fixture
def cli():
    from flows.cli import _register
    from flows.cli.app import app

    _register()
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env={"COLUMNS": "250"})


def test_gate_figures_and_diffs_of_pipeline_versions(edited_line, cli):
    from registry.reports import diff_summary, gate_figures, gate_report, version_diff, version_report

    cfg, reg, ids, run_report = edited_line
    led = Ledger(cfg.ledger_url)
    versions = reg.versions("facts")
    assert [v.number for v in versions] == [1, 2, 3]
    for v, rid in zip(versions[1:], ids):
        figs = {f.gate: f for f in gate_figures(gate_report(reg, v))}
        assert list(figs) == ["efficacy", "paraphrase", "neighbourhood", "perplexity_drift", "retention"]
        # batch of one: each gate's figure is that ticket's own gate result, as the ledger recorded it
        recorded = {g["gate"]: g for g in led.get(rid).metrics}
        for name, f in figs.items():
            assert f.value == recorded[name]["metric"] and f.verdict == recorded[name]["verdict"], name
            assert f.threshold == recorded[name]["threshold"]
        # the version's MLflow run logged the same batch metrics
        run = reg.client.get_run(v.run_id).data.metrics
        assert figs["perplexity_drift"].value is not None
        assert math.isclose(figs["perplexity_drift"].value, run["gate.metrics.perplexity_drift"], rel_tol=1e-9)
        assert 0.0 <= figs["efficacy"].value <= 1.0 and 0.0 <= figs["neighbourhood"].value <= 1.0
        # and each gate's figure as a metric of that run (what the MLflow UI shows)
        assert {k[len("gate.figures."):]: x for k, x in run.items() if k.startswith("gate.figures.")} == {
            name: pytest.approx(f.value) for name, f in figs.items() if f.value is not None}
        # the registered diff against the parent agrees with the registered delta itself
        d = diff_summary(version_diff(reg, v))
        norms = reg.load_delta(v).norms()
        assert d["weights"] == len(norms) >= 1
        assert math.isclose(d["total_norm"], math.sqrt(sum(x * x for x in norms.values())), rel_tol=1e-4)
    # retention: nothing earlier on v2, the first edit re-checked on v3
    ret2 = {f.gate: f for f in gate_figures(gate_report(reg, versions[1]))}["retention"]
    ret3 = {f.gate: f for f in gate_figures(gate_report(reg, versions[2]))}["retention"]
    assert ret2.value is None and ret2.verdict == "skipped"
    assert ret3.value is not None and ret3.n == 1
    assert math.isclose(ret3.value, reg.client.get_run(versions[2].run_id).data.metrics["gate.metrics.retention"])

    # the run's report (Prefect artifact / MLflow report.md) lists the same figures per version
    md = run_report.to_markdown()
    for v in versions[1:]:
        assert all(f.short() in md for f in gate_figures(gate_report(reg, v))), md

    cfg_arg = ["--config", cfg.root / "editops.yaml"]
    # `editops versions LINE --json`: the same figures and diff summaries, per version
    r = cli("versions", "facts", "--json", *cfg_arg)
    rows = json.loads(r.output)
    assert [x["version"] for x in rows] == [1, 2, 3] and rows[0]["gates"] is None
    for row, v in zip(rows[1:], versions[1:]):
        assert row == json.loads(json.dumps(version_report(reg, v), default=str))
        assert row["gates"] == [f.to_dict() for f in gate_figures(gate_report(reg, v))]
    # the table shows each measured figure and the diff
    r = cli("versions", "facts", *cfg_arg)
    for v in versions[1:]:
        for f in gate_figures(gate_report(reg, v)):
            assert f.short() in r.output, (f.short(), r.output)
        assert f"‖ΔW‖ {diff_summary(version_diff(reg, v))['total_norm']:.3g}" in r.output
    # the demo's per-version paragraphs carry the same figures, diff and request ids
    from flows.cli.registry_cmd import version_lines

    paragraphs = version_lines(reg, "facts")
    assert paragraphs[0].startswith("v1 base")
    for text, v, rid in zip(paragraphs[1:], versions[1:], ids):
        assert text.startswith(f"v{v.number} ← v{v.parent} ") and rid in text
        assert all(f.short() in text for f in gate_figures(gate_report(reg, v))), text
        assert f"‖ΔW‖ {diff_summary(version_diff(reg, v))['total_norm']:.3g}" in text
    # `editops show`: the whole gate report, per gate and ticket
    r = cli("show", "facts/3", *cfg_arg)
    assert "gates (passed)" in r.output and ids[1] in r.output
    assert f"{ret3.value:.4g}" in r.output


def test_gate_figures_aggregate_deletion_gates():
    """Per-ticket gates: mean and the deciding worst value; a failing ticket fails the gate."""
    from editing.gates import GateReport, GateResult

    from registry.reports import gate_figures

    rep = GateReport(["a", "b", "c"], results=[
        GateResult("deletion_gone", "ticket", 1.0, 1.0, request_id="a"),
        GateResult("deletion_gone", "ticket", 0.0, 1.0, request_id="b"),
        GateResult("deletion_gone", "ticket", 1.0, 1.0, request_id="c"),
        GateResult("unrelated_unchanged", "batch", 0.95, 0.9),
        GateResult("retention", "batch", None, 0.8),
    ])
    figs = {f.gate: f for f in gate_figures(rep.to_dict())}
    gone = figs["deletion_gone"]
    assert math.isclose(gone.value, 2 / 3) and gone.worst == 0.0 and gone.verdict == "fail" and gone.n == 3
    assert figs["unrelated_unchanged"].value == 0.95 and figs["unrelated_unchanged"].verdict == "pass"
    assert figs["retention"].value is None and figs["retention"].verdict == "skipped"
    assert gone.short() == "deletion_gone 0.67 ✗" and figs["retention"].short() == "retention –"


def test_a_line_whose_heldout_text_changed_measures_the_base_perplexity_again(tmp_path, tiny_model_dir):
    """The base outputs cached for a line keep its earlier tickets' scores; when the line's ``heldout`` names
    other text, the base perplexity (the drift gate's reference) is measured on the new text, not reused."""
    from tinyworld import FILLER

    from editing.metrics.facts import BaseOutputs
    from editing.metrics.text import heldout_sha256, heldout_texts, perplexity
    from editing.models import load
    from flows.pipeline import run_once

    model_dir, reqs = tiny_model_dir
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(FILLER[:4]) + "\n")
    second.write_text("\n".join(reversed(FILLER)) + "\n")
    kw = dict(base_model=str(model_dir), batch_size=1, promotion="auto", gates=OPEN_GATES,
              hyperparameters={**FAST_NSE, "stats_dir": str(tmp_path / "stats")})
    for held, ticket in ((first, reqs[:1]), (second, reqs[1:2])):
        cfg = make_project(tmp_path / "proj", heldout=str(held), **kw)
        (cfg.inbox / f"{held.stem}.json").write_text(json.dumps(fact_tickets(ticket)))
        run_once(cfg, engine="local", say=lambda *_: None)
    (cached,) = (cfg.workdir / "base-outputs").glob("facts-*.json")
    base_outputs = BaseOutputs.load(cached)
    texts = heldout_texts(str(second))
    loaded = load(str(model_dir))
    assert base_outputs.heldout_sha256 == heldout_sha256(texts)
    assert base_outputs.perplexity == pytest.approx(perplexity(loaded.model, loaded.tokenizer, texts), rel=1e-6)
    assert not base_outputs.missing(reqs[:2])   # the first ticket's base scores are still there


def test_a_sampled_heldout_text_is_sampled_once_and_kept_for_later_runs(tmp_path, tiny_model_dir, monkeypatch):
    """``heldout: samples:N``: the line's base samples the texts once, kept under the workdir; a run with nothing
    queued does not sample, a later run gates on the same texts, and an unreadable kept file is sampled again."""
    import editing.stats as stats
    from editing.metrics.facts import BaseOutputs
    from editing.metrics.text import HELDOUT_SAMPLE_SEED, heldout_sha256
    from flows.pipeline import run_once

    real, heldout_calls = stats.model_samples, []

    def counted(*args, **kwargs):   # the real sampler; only counts the held-out ones (C0's use seed 0)
        if kwargs.get("seed") == HELDOUT_SAMPLE_SEED:
            heldout_calls.append(kwargs.get("n"))
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "model_samples", counted)
    model_dir, reqs = tiny_model_dir
    cfg = make_project(tmp_path / "proj", base_model=str(model_dir), batch_size=1, promotion="auto", gates=OPEN_GATES,
                       hyperparameters={**FAST_NSE, "stats_dir": str(tmp_path / "stats")}, heldout="samples:3")

    def run(ticket=None):
        if ticket is not None:
            (cfg.inbox / f"{ticket[0].request_id}.json").write_text(json.dumps(fact_tickets(ticket)))
        run_once(cfg, engine="local", say=lambda *_: None)

    run(reqs[:1])
    (kept,) = (cfg.workdir / "heldout").glob("facts-*-samples-3.json")
    texts = json.loads(kept.read_text())["texts"]
    assert heldout_calls == [3] and len(texts) == 3
    run()                                   # nothing queued: no sampling
    run(reqs[1:2])                          # the kept texts, not a new sample
    assert heldout_calls == [3]
    (cached,) = (cfg.workdir / "base-outputs").glob("facts-*.json")
    assert BaseOutputs.load(cached).heldout_sha256 == heldout_sha256(texts)
    assert len(Ledger(cfg.ledger_url).rows(line="facts", state="applied")) == 2
    kept.write_text("{not json")            # a damaged file is sampled again (same seed: the same texts)
    run(reqs[2:3])
    assert heldout_calls == [3, 3] and json.loads(kept.read_text())["texts"] == texts

"""Export (merged HF dir, PEFT LoRA), aliases with recorded moves, and version diffs, on real MLflow."""
from __future__ import annotations

import json

import pytest
import torch
from registry_helpers import random_delta

from editing.errors import ExportError, PromotionRefusedError, VersionNotFoundError


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exports_match_the_materialised_version(reg, line_name, model_dirs, tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from registry.export import export_merged, export_peft

    base = model_dirs[arch]
    reg.ensure_line(line_name, base)
    reg.register_version(line_name, 1, random_delta(base, layers=(0,), rank=2, seed=21, scale=0.3))
    reg.register_version(line_name, 2, random_delta(base, layers=(0, 1), rank=3, seed=22, scale=0.3))
    ref = f"models:/{line_name}/3"
    model, tok = reg.load(ref)
    ids = tok("the capital of france is paris", return_tensors="pt")
    with torch.no_grad():
        want = model(**ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(**ids).logits
    assert (want - base_logits).abs().max() > 1e-3  # the deltas do change the output

    merged = export_merged(reg, ref, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # no editops involved
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, want, atol=1e-5, rtol=1e-5)
    assert json.loads((merged / "editops_version.json").read_text())["chain"] == [1, 2, 3]

    adapter = export_peft(reg, ref, tmp_path / "lora")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        got = peft_model(**ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert max(cfg["rank_pattern"].values()) == 5  # layer 0: 2 + 3 stacked, numerical rank kept exactly


def test_export_of_the_base_as_adapter_is_refused(reg, line_name, model_dirs, tmp_path):
    from registry.export import export_peft

    reg.ensure_line(line_name, model_dirs["llama"])
    with pytest.raises(ExportError, match="base model"):
        export_peft(reg, f"models:/{line_name}/1", tmp_path / "x")


def test_promote_rollback_and_recorded_moves(reg, line_name, model_dirs):
    base = model_dirs["llama"]
    reg.ensure_line(line_name, base)
    reg.register_version(line_name, 1, random_delta(base, seed=31), gate_report={"passed": True})
    reg.register_version(line_name, 2, random_delta(base, seed=32), gate_report={"passed": False})
    reg.register_version(line_name, 3, random_delta(base, seed=33), gate_report={"passed": True})
    assert reg.alias_version(line_name, "candidate") == 4
    with pytest.raises(PromotionRefusedError, match="gates failed"):
        reg.promote(line_name, 3, policy="gates", who="alice")
    reg.promote(line_name, 2, policy="gates", who="alice", why="first release")
    reg.promote(line_name, who="bob", why="candidate looks good")  # default: the candidate
    assert reg.alias_version(line_name, "champion") == 4
    reg.rollback(line_name, who="carol", why="regression report #12")
    assert reg.alias_version(line_name, "champion") == 2
    with pytest.raises(PromotionRefusedError, match="not earlier"):
        reg.rollback(line_name, to=3)
    with pytest.raises(VersionNotFoundError, match="no earlier champion"):
        reg.rollback(line_name)
    moves = reg.alias_history(line_name, "champion")
    assert [(m.from_version, m.to_version, m.who, m.action) for m in moves] == [
        (None, 2, "alice", "promote"), (2, 4, "bob", "promote"), (4, 2, "carol", "rollback")]
    assert moves[-1].why == "regression report #12"
    assert [m.to_version for m in reg.alias_history(line_name, "candidate")] == [2, 4]
    model, _ = reg.load(f"models:/{line_name}@champion")
    assert model.editops_version == f"models:/{line_name}/2"
    assert "champion" in reg.version(line_name, 2).aliases


def test_diff_weights_requests_and_behaviour(reg, line_name, model_dirs, tmp_path):
    from registry.diffs import DiffReport

    base = model_dirs["gpt2"]
    probes = [{"prompt": "the capital of france is", "target": "paris"}, {"prompt": "rome is a city in", "target": "italian"}]
    reg.ensure_line(line_name, base, probes=probes)
    d2 = random_delta(base, layers=(1,), rank=2, seed=41, scale=2.0, request_ids=["r1", "r2"])
    reg.register_version(line_name, 1, d2)
    d3 = random_delta(base, layers=(0,), rank=1, seed=42, scale=0.5, request_ids=["r3"])
    report = reg.diff(line_name, None, 2)
    assert (report.a, report.b, report.added_requests) == (1, 2, ["r1", "r2"])
    [layer] = report.layers
    assert layer.rank == 2 and layer.layer == 1
    assert layer.norm == pytest.approx(float(torch.linalg.matrix_norm(d2.dense(layer.weight))), rel=1e-6)
    assert [p.prompt for p in report.probes] == [p["prompt"] for p in probes]
    assert all(0 <= p.p_target_a <= 1 and 0 <= p.p_target_b <= 1 for p in report.probes)
    assert any(abs(p.p_target_a - p.p_target_b) > 1e-4 for p in report.probes)  # a large delta moves them

    v3 = reg.register_version(line_name, 2, d3, diff=reg.diff(line_name, 2, 2, behaviour=False))
    assert {"diff.json", "diff.md", "diff.html", "diff.png"} <= set(v3.artifact_sha256)
    back = reg.diff(line_name, 3, 1, behaviour=False)  # going backwards removes requests
    assert back.removed_requests == ["r1", "r2", "r3"] and {x.layer for x in back.layers} == {0, 1}
    files = report.write(tmp_path / "d")
    assert [f.name for f in files] == ["diff.json", "diff.md", "diff.html", "diff.png"]
    assert (tmp_path / "d" / "diff.png").read_bytes()[:4] == b"\x89PNG"
    assert DiffReport.from_dict(json.loads(files[0].read_text())).to_dict() == report.to_dict()
    assert "r1, r2" in files[1].read_text()
    run_id = reg.diff(line_name, 1, 3, log=True).meta["mlflow_run_id"]
    runs = reg.client.search_runs([reg._line_experiment(line_name)], "tags.`editops.diff` = '1->3'")
    assert [r.info.run_id for r in runs] == [run_id]
    arts = [a.path for a in reg.client.list_artifacts(runs[0].info.run_id, "diff")]
    assert "diff/diff.png" in arts and "diff/diff.json" in arts

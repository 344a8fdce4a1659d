"""The project model catalog and the `editops models` / `editops build` commands (real DVC)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from editing.catalog import CATALOG, DEFAULT_MODEL, get, project_root
from editing.errors import EditopsError


def _cli():
    from flows.cli import _register
    from flows.cli.app import app

    _register()
    return app


def test_catalog_lists_the_three_project_models():
    assert DEFAULT_MODEL in CATALOG
    assert {e.line for e in CATALOG.values()} == {"smollm2-135m-facts", "factworld-gpt2-facts",
                                                   "translator-marian-deletions"}
    assert get("translator-marian").kind == "seq2seq" and get("translator-marian").stage == "translator"
    with pytest.raises(EditopsError, match="known: smollm2-135m"):
        get("gpt-5")


def test_catalog_stages_exist_in_dvc_yaml():
    import yaml

    root = project_root(Path(__file__).parent)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for e in CATALOG.values():
        if e.stage != "translator" or "translator" in stages:  # the translator stage is a teammate's
            assert e.stage in stages and e.requests_stage in stages


def test_models_command_reports_built_models(tmp_path, monkeypatch, tiny_fact_model):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    shutil.copytree(tiny_fact_model.model_dir, tmp_path / "models" / "factworld-gpt2")
    (tmp_path / "data" / "requests").mkdir(parents=True)
    shutil.copy(tiny_fact_model.requests_path, tmp_path / "data" / "requests" / "factworld.jsonl")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(_cli(), ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    fw = rows["factworld-gpt2"]
    assert fw["built"] and fw["request_count"] == 300 and len(fw["fingerprint"]) == 64
    assert not rows["smollm2-135m"]["built"] and rows["smollm2-135m"]["request_count"] is None
    table = CliRunner().invoke(_cli(), ["models", "--no-fingerprints"])
    assert table.exit_code == 0 and "factworld-gpt2" in table.output


def test_build_command_runs_dvc_repro_for_the_model_stage(tmp_path, monkeypatch):
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    write = "import pathlib; p = pathlib.Path('models/factworld-gpt2'); p.mkdir(parents=True); (p / 'config.json').write_text('{}')"
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        f"  factworld:\n    cmd: python -c \"{write}\"\n    outs:\n      - models/factworld-gpt2\n"
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(_cli(), ["build", "factworld-gpt2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "models" / "factworld-gpt2" / "config.json").is_file()
    assert (tmp_path / "dvc.lock").is_file()
    bad = CliRunner().invoke(_cli(), ["build", "no-such-model"])
    assert isinstance(bad.exception, EditopsError)


def test_build_runs_stages_with_this_environments_python_when_path_lacks_it(tmp_path, monkeypatch):
    """`./run demo` calls `.venv/bin/editops` without activating the venv: a stage's `python` must still be
    the venv's (with torch), not the first one on PATH (a clean-clone demo failed this way)."""
    from flows.build import repro

    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  probe:\n    cmd: python -c \"import sys, torch; open('out.txt', 'w').write(sys.executable)\"\n"
        "    outs:\n      - out.txt\n")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    done = repro(["probe"], tmp_path, capture=True)
    assert done.returncode == 0, done.stderr
    assert Path((tmp_path / "out.txt").read_text()).parent == Path(sys.executable).parent

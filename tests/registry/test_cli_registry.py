"""`editops versions/show/diff/promote/rollback/export` against a real sqlite MLflow store."""
from __future__ import annotations

import subprocess
import sys

import pytest
from registry_helpers import random_delta
from typer.testing import CliRunner

from editing.errors import PromotionRefusedError


@pytest.fixture
def cli():
    from flows.cli import _register
    from flows.cli.app import app

    _register()
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=True, env={"COLUMNS": "200"})


def test_registry_commands(cli, reg, line_name, model_dirs, tmp_path, sqlite_registry_uri):
    base = model_dirs["gpt2"]
    reg.ensure_line(line_name, base, probes=["the capital of france is"])
    reg.register_version(line_name, 1, random_delta(base, seed=81, request_ids=["q1"]), gate_report={"passed": True})
    reg.register_version(line_name, 2, random_delta(base, seed=82, request_ids=["q2"]), gate_report={"passed": False})
    common = ["--tracking-uri", sqlite_registry_uri, "--home", reg.config.home]
    # the CLI builds its own Registry on the same store; artifacts live where the experiment says
    r = cli("versions", line_name, *common)
    assert r.exit_code == 0, r.output
    assert "revert" not in r.output and "pass" in r.output and "fail" in r.output and "candidate" in r.output
    r = cli("versions", *common)
    assert line_name in r.output
    r = cli("promote", line_name, "--why", "release 1", "--who", "dana", *common)
    assert r.exit_code == 0 and "→ 2" in r.output, r.output
    r = cli("promote", line_name, "3", "--policy", "gates", *common)
    assert isinstance(r.exception, PromotionRefusedError)
    r = cli("promote", line_name, "3", "--why", "hotfix", *common)
    assert r.exit_code == 0
    r = cli("rollback", line_name, "--why", "bad answers", *common)
    assert r.exit_code == 0 and "3 → 2" in r.output, r.output
    r = cli("show", f"{line_name}@champion", *common)
    assert r.exit_code == 0 and "lineage: 1 → 2" in r.output and "delta.safetensors" in r.output and "dana" in r.output
    r = cli("diff", line_name, "1", "3", "--out", tmp_path / "diff", *common)
    assert r.exit_code == 0, r.output
    assert "q1, q2" in r.output and (tmp_path / "diff" / "diff.png").is_file()
    r = cli("export", f"{line_name}/3", "--out", tmp_path / "merged", *common)
    assert r.exit_code == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), r.output


def test_cli_error_is_one_red_line(model_dirs, tmp_path, sqlite_registry_uri):
    proc = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "versions", "no-such-line",
                           "--tracking-uri", sqlite_registry_uri, "--home", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "no model line 'no-such-line'" in proc.stderr and "Traceback" not in proc.stderr

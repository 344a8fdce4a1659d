"""A fresh embedded (sqlite) store opened by several processes at once is created once, not raced."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from editing.errors import RegistryUnavailableError
from registry import Registry

ROOT = Path(__file__).resolve().parents[2]

# each process signals it is ready (imports done), waits for the go file, then opens the store and
# creates or finds the line's experiment: the moment two workers start on a new project
_OPEN = """
import sys, time
from pathlib import Path
home = Path(sys.argv[1]); me = sys.argv[2]
from registry import Registry
(home / f"ready-{me}").touch()
while not (home / "go").exists():
    time.sleep(0.005)
reg = Registry(f"sqlite:///{home}/mlflow.db", None, str(home / "artifacts"), home=home)
print("experiment", reg.experiment_id("editops-facts"))
"""


@pytest.mark.slow
def test_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path):
    """Without the creation lock, 3 processes on a fresh mlflow.db failed in each of 3 trials
    (MLflow's migrations raced: "duplicate column name", "Online migration expected to match one row")."""
    n = 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN, str(tmp_path), str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < n and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [o[1][-1500:] for o in outs]
    ids = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(ids) == 1  # one experiment, found or created by all four
    assert len(Registry(f"sqlite:///{tmp_path}/mlflow.db", None, str(tmp_path / "artifacts"),
                        home=tmp_path).client.search_experiments()) == 2  # Default + editops-facts


def test_a_store_held_by_its_creator_too_long_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITOPS_STORE_INIT_TIMEOUT", "0.2")
    with FileLock(str(tmp_path / "mlflow.db") + ".init.lock"):  # another process creating the store
        with pytest.raises(RegistryUnavailableError, match="EDITOPS_STORE_INIT_TIMEOUT"):
            Registry(f"sqlite:///{tmp_path}/mlflow.db", None, str(tmp_path / "artifacts"), home=tmp_path)


def test_a_line_whose_creator_stopped_before_its_base_version_is_completed(reg, line_name, model_dirs, monkeypatch):
    """The registered model exists but its base version was never published (the creating process
    died in between, or is still publishing): ensure_line waits briefly, then publishes the base."""
    from editing.errors import FingerprintMismatchError
    from editing.models import load
    from registry.api import LINE_TAG
    from registry import versions as V

    fp = load(model_dirs["gpt2"]).fingerprint
    reg.client.create_registered_model(line_name, tags={LINE_TAG: "true", V.BASE_FP: fp})
    monkeypatch.setenv("EDITOPS_LINE_BASE_WAIT", "0.5")
    with pytest.raises(FingerprintMismatchError, match="never published"):
        reg.ensure_line(line_name, model_dirs["llama"])  # another base under the same name is refused
    v1 = reg.ensure_line(line_name, model_dirs["gpt2"])
    assert (v1.number, v1.kind, v1.base_fingerprint) == (1, "base", fp)
    assert [v.number for v in reg.versions(line_name)] == [1]
    assert reg.ensure_line(line_name, model_dirs["gpt2"]).number == 1  # and it is idempotent again

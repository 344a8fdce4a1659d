"""``dvc.lock`` is committed with the source each stage was built from.

A change to a stage's source file or parameters committed without ``dvc repro`` makes every fresh clone's
``dvc repro`` (the demo runs one) rebuild that stage and rewrite ``dvc.lock`` (5e50c83 changed
``editing/metrics/facts.py``, a dependency of ``countries``, without the lock). Real DVC reads the repository;
the models themselves are not needed (in a clean clone they show as missing, which is not a stale lock).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_in_dvc_lock_was_built_from_the_committed_sources_and_params():
    out = subprocess.run([str(Path(sys.executable).with_name("dvc")), "status", "--json"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True,
                                 text=True).stdout.split())
    stale = []
    for stage, changes in json.loads(out or "{}").items():
        for change in changes:
            if change == "changed command":   # the stage's cmd in dvc.yaml is not the one it was built with
                stale.append(f"{stage}: command")
            if not isinstance(change, dict):
                continue
            for path, what in change.get("changed deps", {}).items():
                if isinstance(what, dict) or (what == "modified" and path in tracked):   # params, or a source file
                    stale.append(f"{stage}: {path} {what}")
    assert not stale, ("dvc.lock is stale; run `dvc repro` for these stages and commit dvc.lock:\n  "
                       + "\n  ".join(stale))

"""Fixtures for the flows tests: a project config with two lines in a temp dir."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import GateThresholds, LineConfig, ProjectConfig, load_config, write_config


def make_project(root: Path, base_model: str = "models/none", deletion_base: str = "models/none-mt",
                 ledger_url: str | None = None, tracking_uri: str | None = None, **line_kw) -> ProjectConfig:
    wd = root / ".editops"
    cfg = ProjectConfig(
        root=root, workdir=wd,
        lines={
            "facts": LineConfig(name="facts", base_model=base_model, kind="fact", editor="nse",
                                allowed_requesters=["alice", "bob"], **line_kw),
            "mt": LineConfig(name="mt", base_model=deletion_base, kind="deletion", editor="rank-one",
                             allowed_requesters=["*"]),
        },
        ledger_url=ledger_url or f"sqlite:///{wd}/ledger.db",
        tracking_uri=tracking_uri or f"sqlite:///{wd}/mlflow.db",
        artifact_root=wd / "artifacts",
    )
    path = write_config(cfg, root / "editops.yaml")
    loaded = load_config(path)
    loaded.ensure_dirs()
    return loaded


@pytest.fixture
def project(tmp_path) -> ProjectConfig:
    return make_project(tmp_path)

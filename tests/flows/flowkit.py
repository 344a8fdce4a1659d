"""Helpers and fixtures for the flows tests: a project config with two lines in a temp dir, a tiny model.

Imported by this folder's conftest (fixtures) and by tests as ``flowkit`` (a unique name: two
folders' ``conftest`` modules would collide on ``from conftest import``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import GateThresholds, LineConfig, ProjectConfig, load_config, write_config


def make_project(root: Path, base_model: str = "models/none", deletion_base: str = "models/none-mt",
                 ledger_url: str | None = None, tracking_uri: str | None = None, gates: dict | None = None,
                 **line_kw) -> ProjectConfig:
    wd = root / ".editops"
    cfg = ProjectConfig(
        root=root, workdir=wd,
        lines={
            "facts": LineConfig(name="facts", base_model=base_model, kind="fact", editor="nse",
                                allowed_requesters=["alice", "bob"], gates=GateThresholds.from_dict(gates),
                                **line_kw),
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


# ------------------------------------------------------------ a tiny editable model
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "editing"))

OPEN_GATES = {"efficacy": 0.0, "paraphrase": 0.0, "neighbourhood": 0.0, "perplexity_drift": 1e9, "retention": 0.0}
FAST_NSE = {"layers": [0], "locus": "subject", "lam": 30.0, "corpus": "samples:8", "value": {"context_templates": ["{}"], "steps": 8}}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> tuple[Path, list]:
    """A 3-layer GPT-2 overfit on tinyworld's facts (seconds), saved as an HF dir, with 12 fact requests."""
    from tinyworld import build, requests, world

    facts = world(0)
    model, tok = build("gpt2", 2, facts, lr=3e-3, steps=100)
    d = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d, requests(facts, 12)


def fact_tickets(reqs, line: str = "facts", requester: str = "alice") -> list[dict]:
    from flows.tickets import ticket_from_request

    return [ticket_from_request(r, line, requester).payload for r in reqs]


@pytest.fixture
def editable_project(tmp_path, tiny_model_dir):
    """A project whose ``facts`` line edits the tiny model with fast nse settings, gates wide open."""
    model_dir, reqs = tiny_model_dir
    cfg = make_project(tmp_path, base_model=str(model_dir), batch_size=1, promotion="auto",
                       hyperparameters={**FAST_NSE, "stats_dir": str(tmp_path / "stats")}, gates=OPEN_GATES)
    return cfg, reqs


def editops(cfg, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``editops`` CLI in a subprocess on ``cfg``'s project."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *args,
                           "--config", str(cfg.root / "editops.yaml")],
                          cwd=cfg.root, env=e, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------ the exactly-once property, checked on ledger + registry
def check_exactly_once(cfg, ids: list[str]) -> None:
    """Every ticket of ``ids`` applied exactly once, lineage straight, ledger = registry, no orphan version."""
    from flows.ledger import Ledger
    from flows.pipeline import open_registry

    reg = open_registry(cfg)
    led = Ledger(cfg.ledger_url)
    versions = reg.versions("facts")
    # a straight lineage: every version's parent is the one before it
    assert [v.parent for v in versions[1:]] == [v.number for v in versions[:-1]]
    applied = reg.applied_request_ids("facts")
    assert sorted(applied) == sorted(ids) and len(applied) == len(set(applied))  # each ticket once
    where = {rid: v.number for v in versions[1:] for rid in v.request_ids}
    for rid in ids:  # the ledger agrees with the registry; no orphan version
        row = led.get(rid)
        assert row.state == "applied" and row.version == where[rid], (rid, row.state, row.version, where.get(rid))
    assert {rid for v in versions[1:] for rid in v.request_ids} == set(ids)


@pytest.fixture
def postgres_project(tmp_path, tiny_model_dir, postgres_url):
    """``(cfg, reqs, ledger_url)``: the tiny fact line with its ledger in a fresh schema of the real PostgreSQL.

    The schema is dropped afterwards, whether the test passed or not.
    """
    import uuid

    import sqlalchemy as sa

    schema = f"t{uuid.uuid4().hex[:8]}"
    eng = sa.create_engine(postgres_url)
    with eng.begin() as c:
        c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    model_dir, reqs = tiny_model_dir
    cfg = make_project(tmp_path / "proj", base_model=str(model_dir), ledger_url=url, batch_size=2,
                       hyperparameters={**FAST_NSE, "stats_dir": str(tmp_path / "stats")}, gates=OPEN_GATES)
    try:
        yield cfg, reqs, url
    finally:
        with eng.begin() as c:
            c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        eng.dispose()

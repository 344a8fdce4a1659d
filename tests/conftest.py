"""Shared test setup: offline, quiet, single-threaded torch, and tiny models built from configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# tests/ and its subfolders go on sys.path (no __init__.py), so tests/flows and tests/registry could
# shadow the real packages as namespace packages: the project root goes first, and any namespace
# stand-in imported before this ran is dropped. Done once here, for every test folder.
_ROOT = str(Path(__file__).resolve().parents[1])
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)
for _name in ("registry", "editing", "flows"):
    if _name in sys.modules and getattr(sys.modules[_name], "__file__", None) is None:
        del sys.modules[_name]

os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """SQLAlchemy URL of the real PostgreSQL that `.ci/run` starts (`.ci/postgres.sh`).

    Set ``EDITOPS_TEST_POSTGRES_URL``; without it the test is skipped with this reason.
    """
    url = os.environ.get("EDITOPS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("EDITOPS_TEST_POSTGRES_URL is not set: run `bash .ci/postgres.sh` and export the URL it prints")
    return url


@pytest.fixture(scope="session")
def mlflow_sqlite_uri(tmp_path_factory) -> str:
    """A real MLflow sqlite backend store shared by the session (migrations run once, ~7 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db"


@pytest.fixture(scope="session")
def tiny_fact_model(tmp_path_factory):
    """A tiny GPT-2 trained (seconds, one thread) on a seeded synthetic fact world.

    Attributes: ``model_dir`` (HF dir: safetensors + tokenizer), ``requests_path``
    (300 FactRequests as JSONL, read with ``editing.data.world.read_fact_requests``),
    ``corpus`` (general filler text, list of str), ``heldout`` (filler never trained
    on), ``metrics`` (top-1 accuracies; ≥ 0.95 on training templates).
    """
    from editing.training.causal import build_tiny_fact_model

    return build_tiny_fact_model(tmp_path_factory.mktemp("tiny_fact_model"), seed=0)

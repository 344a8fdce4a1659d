"""Registry fixtures: tiny GPT-2 / Llama model directories (built from config, with a real
word-level tokenizer), a registry on the session's sqlite MLflow store, random low-rank deltas,
and real `mlflow server` processes on free 127.0.0.1 ports."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest  # noqa: E402
from registry_helpers import MlflowServer, save_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_model_dir(root / arch, arch) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def sqlite_registry_uri(mlflow_sqlite_uri) -> str:
    return mlflow_sqlite_uri


@pytest.fixture
def reg(sqlite_registry_uri, tmp_path_factory):
    from registry import Registry
    from registry.store import RetryPolicy

    root = tmp_path_factory.mktemp("reg")
    return Registry(sqlite_registry_uri, artifact_root=root / "artifacts", home=root, cache_dir=root / "cache",
                    retry=RetryPolicy(attempts=2, base_delay=0.05))


@pytest.fixture
def line_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real sqlite-backed MLflow server for the session (~12 s start)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()

"""Team setups against real servers on 127.0.0.1: REST, PostgreSQL backend, basic-auth, dead servers."""
from __future__ import annotations

import json
import time
import uuid

import pytest
from registry_helpers import MlflowServer, free_port, random_delta

from editing.errors import RegistryAuthError, RegistryUnavailableError, StaleParentError

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _registry(url, tmp_path, attempts=3, base_delay=0.1):
    from registry import Registry
    from registry.store import RetryPolicy

    return Registry(url, home=tmp_path, cache_dir=tmp_path / "cache",
                    retry=RetryPolicy(attempts=attempts, base_delay=base_delay))


def _roundtrip(reg, base_dir, line):
    reg.ensure_line(line, base_dir)
    d = random_delta(base_dir, seed=51, request_ids=["x1"])
    v2 = reg.register_version(line, 1, d, gate_report={"passed": True})
    with pytest.raises(StaleParentError):
        reg.register_version(line, 1, random_delta(base_dir, seed=52))
    reg.promote(line, policy="gates", who="ci", why="server test")
    assert reg.alias_version(line, "champion") == 2 and isinstance(reg.alias_version(line, "champion"), int)
    model, tok = reg.load(f"models:/{line}@champion")
    assert model.editops_version == f"models:/{line}/2"
    assert reg.applied_request_ids(line) == ["x1"]
    assert [v.number for v in reg.versions(line)] == [1, 2] and reg.version(line, 2).aliases == ["candidate", "champion"]
    return v2


def test_rest_server_roundtrip(mlflow_server, model_dirs, tmp_path):
    reg = _registry(mlflow_server.url, tmp_path)
    v2 = _roundtrip(reg, model_dirs["llama"], f"rest-{uuid.uuid4().hex[:8]}")
    assert isinstance(v2.number, int) and v2.parent == 1  # REST returns str versions: normalised


def test_closed_port_is_a_clear_error_after_backoff(model_dirs, tmp_path):
    reg = _registry(f"http://127.0.0.1:{free_port()}", tmp_path, attempts=3, base_delay=0.2)
    t0 = time.perf_counter()
    with pytest.raises(RegistryUnavailableError, match="unreachable after 3 attempts") as err:
        reg.versions("anything")
    assert time.perf_counter() - t0 >= 0.2 + 0.4  # two backoff waits
    assert "nothing was registered" in str(err.value)


def test_postgres_backend(postgres_url, model_dirs, tmp_path):
    import psycopg2

    from registry import Registry

    dbname = f"editops_mlflow_{uuid.uuid4().hex[:8]}"
    dsn = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {dbname}")
    backend = dsn.rsplit("/", 1)[0] + "/" + dbname
    server = MlflowServer(tmp_path / "pg", backend=backend)
    try:
        _roundtrip(_registry(server.url, tmp_path), model_dirs["llama"], "pg-line")
        # the same store straight through the database URL (no server) sees the same line
        direct = Registry(backend, artifact_root=tmp_path / "unused", home=tmp_path)
        assert [v.number for v in direct.versions("pg-line")] == [1, 2]
    finally:
        server.stop()
        from sqlalchemy import create_engine

        create_engine(backend).dispose()
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        conn.close()


def test_basic_auth_and_a_server_killed_mid_registration(model_dirs, tmp_path, monkeypatch):
    password = f"pw-{uuid.uuid4().hex}"
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
                   f"admin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")  # PBKDF2 once per minute, not per request
    server = MlflowServer(tmp_path / "auth", app_name="basic-auth",
                          env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex})
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        anon = _registry(server.url, tmp_path / "anon")
        with pytest.raises(RegistryAuthError, match="MLFLOW_TRACKING_USERNAME"):
            anon.ensure_line("secured", model_dirs["gpt2"])
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(RegistryAuthError) as err:
            anon.lines()
        assert "wrong" not in str(err.value)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        reg = _registry(server.url, tmp_path / "ok")
        reg.ensure_line("secured", model_dirs["gpt2"])
        v2 = reg.register_version("secured", 1, random_delta(model_dirs["gpt2"], seed=71), gate_report={"passed": True})
        reg.promote("secured", 2, who="admin-on-call", why="auth test")
        # the password appears nowhere editops wrote: version/model tags, run tags/params, artifacts
        texts = [json.dumps(v.tags) for v in reg.versions("secured")]
        texts.append(json.dumps(reg.client.get_registered_model("secured").tags))
        for exp in reg.client.search_experiments():
            for run in reg.client.search_runs([exp.experiment_id]):
                texts += [json.dumps(run.data.tags), json.dumps(run.data.params)]
        for f in ("manifest.json", "request_ids.json", "gate_report.json"):
            local = reg.client.download_artifacts(v2.run_id, f"version/{f}", str(tmp_path))
            texts.append(open(local).read())
        assert texts and not any(password in t for t in texts)

        # then the server dies at the worst moment: artifacts are uploaded, the version is not created yet
        real_create = reg.client.create_model_version

        def kill_then_create(*args, **kwargs):
            server.stop()  # a real crash (SIGTERM to the server's process group), not a stand-in
            return real_create(*args, **kwargs)

        reg.client.create_model_version = kill_then_create
        with pytest.raises(RegistryUnavailableError, match="nothing was registered"):
            reg.register_version("secured", 2, random_delta(model_dirs["gpt2"], seed=72))
    finally:
        server.stop()
    from mlflow import MlflowClient

    direct = MlflowClient(server.backend, server.backend)  # read the dead server's own store
    versions = direct.search_model_versions("name='secured'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # no half-registered version 3
    assert all(v.tags["editops.kind"] in ("base", "delta") for v in versions)

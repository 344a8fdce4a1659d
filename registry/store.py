"""Where the registry lives, and calling MLflow with retries and typed errors.

URIs, in order of precedence: the arguments, ``EDITOPS_TRACKING_URI`` /
``EDITOPS_REGISTRY_URI``, ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``, and
the **embedded default**: ``sqlite:///<home>/mlflow.db`` with local artifacts in
``<home>/artifacts`` where ``<home>`` is ``$EDITOPS_HOME`` or ``./.editops``.

Team setups point the tracking URI at a real server (``http://host:port``, any
backend store behind it, e.g. ``mlflow server --backend-store-uri
postgresql://...``) or straight at a database URL. Credentials for MLflow's
basic-auth app are read by MLflow itself from ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``; editops never reads, logs or stores them.

:func:`call` runs one MLflow operation: transient failures (connection refused,
timeouts, 5xx, a locked sqlite file) are retried with exponential backoff
(``delay = base · 2^attempt``, capped), then raised as
:class:`RegistryUnavailableError`; 401/403 become :class:`RegistryAuthError`
at once. MLflow's own HTTP retries are turned down (unless the user set them)
so that this policy, not MLflow's two-minute default, decides how long a dead
server is waited for.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from editing.errors import RegistryAuthError, RegistryError, RegistryUnavailableError

T = TypeVar("T")

#: MLflow's HTTP client settings editops lowers unless the user set them.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

_TRANSIENT_MARKERS = (
    "max retries exceeded",
    "connection refused",
    "failed to establish a new connection",
    "connection aborted",
    "remotedisconnected",
    "connection reset",
    "read timed out",
    "timed out",
    "temporarily unavailable",
    "database is locked",
    "could not connect to server",
    "connection to server",
    "server closed the connection",
    "bad gateway",
    "service unavailable",
    "gateway timeout",
    "error code 502",
    "error code 503",
    "error code 504",
)
_AUTH_MARKERS = ("401", "403", "unauthorized", "permission denied", "permission_denied", "unauthenticated",
                 "you are not authenticated")


def default_home() -> Path:
    """``$EDITOPS_HOME`` or ``./.editops`` (gitignored): the embedded registry's directory."""
    return Path(os.environ.get("EDITOPS_HOME") or Path.cwd() / ".editops").resolve()


@dataclass(frozen=True)
class StoreConfig:
    """Resolved URIs. ``artifact_root`` is only used when experiments are created locally."""

    tracking_uri: str
    registry_uri: str
    artifact_root: str | None
    home: Path

    @property
    def is_remote(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))


def resolve(tracking_uri: str | None = None, registry_uri: str | None = None,
            artifact_root: str | os.PathLike | None = None, home: str | os.PathLike | None = None) -> StoreConfig:
    """Fill in the URIs from arguments, environment, or the embedded default."""
    home_path = Path(home).resolve() if home else default_home()
    tracking = tracking_uri or os.environ.get("EDITOPS_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    embedded = tracking is None
    if embedded:
        home_path.mkdir(parents=True, exist_ok=True)
        tracking = f"sqlite:///{home_path / 'mlflow.db'}"
    registry = registry_uri or os.environ.get("EDITOPS_REGISTRY_URI") or os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    if artifact_root is not None:
        root: str | None = str(artifact_root)
    elif not tracking.startswith(("http://", "https://")):
        root = str(home_path / "artifacts")  # a database store: artifacts must live somewhere local
    else:
        root = None  # the server decides (proxied artifacts)
    if root is not None and "://" not in root:
        root = Path(root).resolve().as_uri()
    return StoreConfig(tracking, registry, root, home_path)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for any other store or an in-memory one)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def open_client(config: StoreConfig) -> Any:
    """An ``MlflowClient`` for ``config``; a sqlite database is created once, under a file lock beside it.

    MLflow creates and migrates a sqlite store when a client is first built on it, without
    coordination: processes opening a fresh file at once (two workers, a schedule and an on-demand
    run) fail with "duplicate column name" or "Online migration expected to match one row"
    (measured: 3 processes on a fresh file, a failure in each of 3 trials). Under ``<db>.init.lock``
    the first process creates and migrates; the others wait, then find a current schema.
    """
    from contextlib import ExitStack

    from filelock import FileLock, Timeout
    from mlflow import MlflowClient

    dbs = sorted({db for db in (sqlite_path(config.tracking_uri), sqlite_path(config.registry_uri)) if db})
    wait = float(os.environ.get("EDITOPS_STORE_INIT_TIMEOUT", "300"))
    with ExitStack() as held:
        for db in dbs:  # sorted: two processes take the locks in the same order
            db.parent.mkdir(parents=True, exist_ok=True)
            lock = str(db) + ".init.lock"
            try:
                held.enter_context(FileLock(lock, timeout=wait))
            except Timeout as exc:
                raise RegistryUnavailableError(
                    f"another process held {lock} for {wait:.0f} s while creating the MLflow store {db}; wait "
                    "for it to finish (or stop it) and retry, or raise EDITOPS_STORE_INIT_TIMEOUT") from exc
        client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.registry_uri)
        if sqlite_path(config.registry_uri):
            client.search_registered_models(max_results=1)  # the registry store is built on first use
    return client


def configure_http_defaults() -> None:
    """Lower MLflow's own HTTP retries/timeouts so :func:`call` owns the retry policy."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries; the wait before try ``i+1`` is ``min(base · 2^i, cap)`` seconds."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delays(self) -> list[float]:
        return [min(self.base_delay * 2**i, self.max_delay) for i in range(max(self.attempts - 1, 0))]

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        return cls(attempts=int(os.environ.get("EDITOPS_REGISTRY_RETRIES", "4")),
                   base_delay=float(os.environ.get("EDITOPS_REGISTRY_BACKOFF", "0.5")))


def _text(exc: BaseException) -> str:
    parts = [type(exc).__name__, str(exc)]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        parts += [type(cause).__name__, str(cause)]
    return " ".join(parts).lower()


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: the server/database was unreachable or overloaded."""
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc.__context__, (requests.ConnectionError, requests.Timeout)):
        return True  # MLflow wraps them in MlflowException("API request ... failed with exception ...")
    text = _text(exc)
    return any(m in text for m in _TRANSIENT_MARKERS)


def is_auth_failure(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", "")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return True
    text = _text(exc)
    return ("status code 401" in text or "status code 403" in text or "unauthorized" in text
            or "you are not authenticated" in text or "permission denied" in text)


def error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", "") or "")


def call(fn: Callable[..., T], *args: Any, what: str, uri: str = "", policy: RetryPolicy | None = None,
         sleep: Callable[[float], None] = time.sleep, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)``; retry transient failures with backoff; map failures to typed errors.

    Non-transient MLflow errors (e.g. RESOURCE_DOES_NOT_EXIST) are re-raised as they are,
    for the caller to translate into its own typed error.
    """
    policy = policy or RetryPolicy.from_env()
    delays = policy.delays()
    last: BaseException | None = None
    for attempt in range(len(delays) + 1):
        try:
            return fn(*args, **kwargs)
        except RegistryError:
            raise
        except Exception as exc:  # MLflow raises MlflowException/RestException/requests errors
            if is_auth_failure(exc):
                raise RegistryAuthError(
                    f"{what}: the tracking server at {uri or '?'} refused access ({_short(exc)}). "
                    "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
                    "for a user with permission on this registry."
                ) from exc
            if not is_transient(exc):
                raise
            last = exc
            if attempt < len(delays):
                sleep(delays[attempt])
    raise RegistryUnavailableError(
        f"{what}: the registry at {uri or '?'} is unreachable after {policy.attempts} attempts with backoff "
        f"({_short(last)}). Start the tracking server or fix EDITOPS_TRACKING_URI / MLFLOW_TRACKING_URI; "
        "nothing was registered."
    ) from last


def _short(exc: BaseException | None, limit: int = 200) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"

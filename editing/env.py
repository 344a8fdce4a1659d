"""Environment defaults that keep every tool offline and quiet (see shared stack notes).

Values the user already set are left alone.
"""
from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_offline_defaults(hub_offline: bool | None = None) -> None:
    """Set the telemetry-off variables; ``HF_HUB_OFFLINE=1`` too unless the user chose otherwise."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if hub_offline or (hub_offline is None and "HF_HUB_OFFLINE" not in os.environ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

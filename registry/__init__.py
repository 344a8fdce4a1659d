"""editops' versioned model registry on MLflow (see :mod:`registry.api` for the API).

``from registry import Registry`` — MLflow is imported when a Registry is built,
so importing this package stays light. Nothing here imports Prefect.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Registry", "Version", "DiffReport"]


def __getattr__(name: str) -> Any:
    if name == "Registry":
        from registry.api import Registry

        return Registry
    if name == "Version":
        from registry.versions import Version

        return Version
    if name == "DiffReport":
        from registry.diffs import DiffReport

        return DiffReport
    raise AttributeError(name)

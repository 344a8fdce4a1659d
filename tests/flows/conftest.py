"""Fixtures of the flows tests live in :mod:`flowkit` (importable by tests under a unique name)."""
from flowkit import *  # noqa: F401,F403  (fixtures: project, tiny_model_dir, ...)

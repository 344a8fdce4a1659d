"""Command line entry point: ``editops <command>``.

Each ``*_cmd`` module registers its commands on :data:`flows.cli.app.app`.
Errors derived from :class:`editing.errors.EditopsError` are printed as one
red line and exit with status 2; anything else is a bug and shows a traceback.
"""
from __future__ import annotations

import os
import sys
from importlib import import_module

from flows.cli.app import app

COMMAND_MODULES = ("models_cmd", "edit_cmd", "registry_cmd", "tickets_cmd")


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            import_module(f"flows.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"flows.cli.{name}":
                raise


def main() -> None:
    from editing.env import configure_offline_defaults
    from editing.errors import EditopsError

    configure_offline_defaults()
    # artifact reads (gate reports, diffs, deltas) would each draw a download progress bar on stderr
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _register()
    try:
        app()
    except EditopsError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)

"""The ``editops`` typer application; command modules register on ``app``.

Heavy libraries (torch, transformers, MLflow, Prefect) are imported inside the
commands, so ``editops --help`` starts fast.
"""
from __future__ import annotations

import typer

app = typer.Typer(
    name="editops",
    help="Continual model editing with a versioned model registry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

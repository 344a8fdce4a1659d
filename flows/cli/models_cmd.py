"""``editops models`` (list the project's models) and ``editops build [NAME]`` (``dvc repro`` its stages).

The models are the entries of :data:`editing.catalog.CATALOG`. ``build`` runs
``dvc repro <stage>`` for the model's stage and its request set's stage (DVC
skips what is up to date); with no name it runs ``dvc repro`` for everything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.app import app


def _fingerprint(entry, root: Path) -> str:
    """The fingerprint the build recorded, else computed from the weights (loads the model)."""
    from editing.catalog import source_info

    fp = source_info(entry, root).get("fingerprint")
    if fp:
        return fp
    from editing.models import load

    return load(entry.model_path(root)).fingerprint


@app.command("models")
def models_command(
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    fingerprints: bool = typer.Option(True, "--fingerprints/--no-fingerprints",
                                      help="show weight fingerprints of built models"),
) -> None:
    """List the project's models: name, kind, built?, directory, request count, fingerprint
    (``--json`` adds the request file, model line and DVC stage)."""
    from editing.catalog import CATALOG, project_root

    root = project_root()
    rows = []
    for e in CATALOG.values():
        built = e.is_built(root)
        rows.append({
            "name": e.name, "kind": e.kind, "built": built, "dir": e.model_dir, "requests": e.requests,
            "request_count": e.request_count(root), "line": e.line, "stage": e.stage,
            "fingerprint": _fingerprint(e, root) if built and fingerprints else None,
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"editops models ({root})")
    for col in ("name", "kind", "built", "dir", "requests", "fingerprint"):
        table.add_column(col, no_wrap=True, overflow="fold")
    for r in rows:
        count = "-" if r["request_count"] is None else str(r["request_count"])
        table.add_row(r["name"], r["kind"], "yes" if r["built"] else "no", r["dir"], count,
                      (r["fingerprint"] or "-")[:12])
    Console().print(table)


@app.command("build")
def build_command(
    name: Optional[str] = typer.Argument(None, help="model name (see `editops models`); default: all"),
    force: bool = typer.Option(False, "--force", help="rebuild even if DVC says it is up to date"),
) -> None:
    """Build a project model and its request set with ``dvc repro``."""
    from editing.catalog import get, project_root
    from editing.errors import EditopsError

    root = project_root()
    if not (root / "dvc.yaml").is_file():
        raise EditopsError(f"no dvc.yaml in {root} or above: run `editops build` inside the editops project")
    stages = [] if name is None else list(dict.fromkeys([get(name).stage, get(name).requests_stage]))
    from flows.build import dvc_command, repro

    cmd = dvc_command() + ["repro", *(["--force"] if force else []), *stages]
    typer.echo(" ".join(cmd))
    rc = repro(stages, root, force=force).returncode
    if rc != 0:
        raise EditopsError(f"`{' '.join(cmd)}` failed with exit status {rc}; see DVC's output above")

"""Dependencies point one way: flows → registry → editing; editing is pure torch + transformers."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "editing": {"mlflow", "prefect", "registry", "flows", "pandera", "dvc"},
    "registry": {"prefect", "flows"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upward(package):
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_the_three_packages_exist():
    for package in ("editing", "registry", "flows"):
        assert (ROOT / package / "__init__.py").is_file()

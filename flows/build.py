"""Build project models with DVC: ``dvc repro <stages>`` run so that the stages use *this* environment.

A DVC stage's ``cmd`` says ``python -m ...``; DVC runs it through the shell with the
caller's ``PATH``. Started from ``.venv/bin/editops`` without an activated venv, ``python``
would be the system one (no torch), so :func:`repro` puts the running interpreter's
directory first on ``PATH`` and uses the ``dvc`` next to it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def dvc_command() -> list[str]:
    """``dvc`` from the running interpreter's environment, else the one on ``PATH``."""
    exe = Path(sys.executable).with_name("dvc")
    return [str(exe)] if exe.exists() else ["dvc"]


def stage_env() -> dict[str, str]:
    """The environment for ``dvc repro``: this interpreter's bin directory first on ``PATH``, analytics off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def repro(stages: Sequence[str], root: Path, *, force: bool = False,
          capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``dvc repro [--force] <stages>`` in ``root`` (all stages when ``stages`` is empty)."""
    cmd = dvc_command() + ["repro", *(["--force"] if force else []), *stages]
    return subprocess.run(cmd, cwd=root, env=stage_env(), capture_output=capture, text=True)

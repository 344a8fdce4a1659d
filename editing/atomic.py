"""Atomic file replacement for caches that several processes may fill at once.

Contract of :func:`replace_atomically`: ``write`` fills a temporary file of this call's own
(``mkstemp`` in the target's directory, so the rename stays on one filesystem); the file then
replaces ``path`` with ``os.replace``. A reader sees the old file or the whole new one, never a
partial one; two writers never rename each other's temporary file away (the last rename wins);
nothing is left behind when ``write`` raises.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def replace_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """``path.write_text(text)`` that readers and concurrent writers never see half-done."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding=encoding))

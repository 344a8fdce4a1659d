"""trim_heap returns the heap's free pages to the system (glibc), and is a harmless no-op elsewhere."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from editing.memory import trim_heap

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not glibc, reason="malloc_trim is glibc's")
def test_freed_tensors_pinned_below_a_live_one_are_returned_to_the_system() -> None:
    trim_heap()
    # 64 KiB tensors come from the heap (below glibc's mmap threshold); the last one stays alive, so the
    # freed ones below it are not the heap's free top, which free() alone would give back
    chunks = [torch.ones(16_384) for _ in range(3_000)]   # ~190 MiB
    pin = torch.ones(16_384)
    del chunks
    before = _rss_mb()
    assert trim_heap() is True
    after = _rss_mb()
    assert before - after > 100, (before, after)
    assert pin.sum().item() == 16_384


def test_without_malloc_trim_it_reports_nothing_released(monkeypatch) -> None:
    monkeypatch.setattr("editing.memory._malloc_trim", lambda: None)
    assert trim_heap() is False

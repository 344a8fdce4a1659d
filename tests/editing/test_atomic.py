"""Shared caches written by several processes at once: every writer succeeds, readers never see half a file."""
from __future__ import annotations

import threading

import pytest

from editing.atomic import replace_atomically
from editing.metrics.facts import BaseOutputs, PairScore


def _outputs(i: int) -> BaseOutputs:
    scores = {(f"The capital of C{k} is", f"T{k}"): PairScore(-0.5 * k, -1.0 * k, 2, k % 2 == 0, (k, i))
              for k in range(200)}
    return BaseOutputs(f"fp{i}", scores, perplexity=10.0 + i)


def test_concurrent_saves_of_one_cache_all_succeed_and_leave_a_whole_file(tmp_path):
    """Two pipeline runs scoring the same base wrote one ``base-outputs`` file through one temporary
    name; the slower one's rename then failed (CI, session 12). Each writer now has its own."""
    path = tmp_path / "base-outputs" / "facts-0123.json"
    errors: list[BaseException] = []
    loaded: list[str] = []
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait()
        try:
            for _ in range(25):
                _outputs(i).save(path)
                loaded.append(BaseOutputs.load(path).model_fingerprint)  # a whole file, never a partial one
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(loaded) == 8 * 25 and set(loaded) <= {f"fp{i}" for i in range(8)}
    assert BaseOutputs.load(path).scores == _outputs(int(BaseOutputs.load(path).model_fingerprint[2:])).scores
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]

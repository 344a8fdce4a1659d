"""The demo's fact tickets: taken round-robin over the request file's relations."""
from __future__ import annotations

import json
from pathlib import Path

from flows.demo import _one_per_relation


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_tickets_cycle_through_relations_in_file_order(tmp_path: Path) -> None:
    rows = ([{"request_id": f"cap-{i}", "relation": "capital"} for i in range(3)]
            + [{"request_id": f"lang-{i}", "relation": "language"} for i in range(2)]
            + [{"request_id": "cur-0", "relation": "currency"}])
    path = _write(tmp_path / "r.jsonl", rows)
    got = [r["request_id"] for r in _one_per_relation(path, 5)]
    assert got == ["cap-0", "lang-0", "cur-0", "cap-1", "lang-1"]
    # more than the file holds: every row once, none repeated
    assert sorted(r["request_id"] for r in _one_per_relation(path, 50)) == sorted(r["request_id"] for r in rows)


def test_rows_without_a_relation_are_one_group(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.jsonl", [{"request_id": "a"}, {"request_id": "b", "relation": "capital"},
                                         {"request_id": "c"}])
    assert [r["request_id"] for r in _one_per_relation(path, 3)] == ["a", "b", "c"]

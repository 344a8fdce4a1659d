"""Malformed-ticket fuzzing: hundreds of bad rows; nothing crashes, nothing valid is lost."""
from __future__ import annotations

import csv
import io
import json
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from flows.intake import scan_inbox
from flows.ledger import Ledger
from flows.schemas import validate_records

ODD_VALID = ["Zürich", "東京", "Ελλάδα", "emoji 🚀", "مرحبا", "a\tb", "İstanbul", "naïve café"]


def _valid(i: int, rng: random.Random) -> dict:
    subj = f"Subj{i}" if rng.random() < 0.7 else f"{rng.choice(ODD_VALID)} {i}"
    return {"request_id": f"ok-{i}", "line": "facts", "requester": rng.choice(["alice", "bob"]),
            "subject": subj, "prompt": "{} is located in", "target_new": f"Place{i}",
            "priority": rng.choice([0, 5, "7", None]), "paraphrases": [f"Where is {subj}? In"],
            "extra_field": "ignored"}


CSV_BAD = (0, 2, 3, 5, 6, 7, 9)  # mutations that stay wrong once written as CSV text


def _bad(i: int, rng: random.Random, csv_safe: bool = False) -> dict | object:
    r = _valid(i, rng)
    r["request_id"] = f"bad-{i}"
    mutation = rng.choice(CSV_BAD) if csv_safe else rng.randrange(12)
    if mutation == 0:
        del r[rng.choice(["request_id", "line", "requester", "subject", "prompt", "target_new"])]
    elif mutation == 1:
        r[rng.choice(["subject", "target_new", "line", "requester"])] = rng.choice([3, 2.5, True, ["x"], {"a": 1}])
    elif mutation == 2:
        r[rng.choice(["subject", "prompt", "target_new"])] = "x" * rng.choice([5_000, 100_000])
    elif mutation == 3:
        r["target_new"] = "bad\x00nul"
    elif mutation == 4:
        r["request_id"] = rng.choice(["has space", "", "é/" * 3, "a" * 500, 12, None])
    elif mutation == 5:
        r["priority"] = rng.choice([99, -1, "high", 3.7, [1]])
    elif mutation == 6:
        r["prompt"] = "no placeholder here"
    elif mutation == 7:
        r["paraphrases"] = rng.choice(["[not json", [1, 2], [["nested"]], ["ok"] * 200]
                                      + ([] if csv_safe else [{"a": "b"}]))
    elif mutation == 8:
        r["created_at"] = rng.choice(["yesterday", "2026-13-45", 12345, "9" * 100])
    elif mutation == 9:
        r["target_new"] = "   "
    elif mutation == 10:
        return rng.choice([17, "a string", None, [1, 2, 3], True])
    else:
        r["neighbours"] = rng.choice([["just a string"], [{"prompt": "p"}], [[1, 2]], 5])
    return r


def _write(project, rng: random.Random, rows: list, n: int) -> None:
    fmt = n % 4
    path = project.inbox / f"batch{n}.{['json', 'jsonl', 'csv', 'yaml'][fmt]}"
    if fmt == 0:
        path.write_text(json.dumps(rows, ensure_ascii=rng.random() < 0.5), encoding="utf-8")
    elif fmt == 1:
        lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rows]
        # odd encodings: a latin-1 byte inside one bad row's string, a truncated line
        for k, r in enumerate(rows):
            if isinstance(r, dict) and str(r.get("request_id", "")).startswith("bad") and rng.random() < 0.2:
                lines[k] = lines[k].replace(b'"Place', b'"Pl\xe9ace', 1)
        lines.append(b'{"request_id": "trunc", "line": "fac')
        path.write_bytes(b"\n".join(lines))
    elif fmt == 2:
        buf = io.StringIO()
        cols = ["request_id", "line", "requester", "subject", "prompt", "target_new", "priority", "paraphrases"]
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            if isinstance(r, dict):
                w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
        data = buf.getvalue()
        path.write_bytes(data.encode("utf-16") if n % 8 == 2 else data.encode("utf-8"))
    else:
        import yaml

        path.write_text(yaml.safe_dump(rows, allow_unicode=True), encoding="utf-8")


def test_fuzzed_files_nothing_crashes_nothing_valid_lost(project):
    rng = random.Random(1234)
    led = Ledger(project.ledger_url)
    expected_valid: set[str] = set()
    n_rows = 0
    i = 0
    for n in range(12):
        rows = []
        for _ in range(40):
            i += 1
            if rng.random() < 0.35:
                r = _valid(i, rng)
                expected_valid.add(r["request_id"])
            else:
                r = _bad(i, rng, csv_safe=n % 4 == 2)
            rows.append(r)
        if n % 4 == 2:  # CSV cannot carry non-dict rows
            rows = [r for r in rows if isinstance(r, dict)]
        n_rows += len(rows) + (1 if n % 4 == 1 else 0)
        _write(project, rng, rows, n)
    reports = scan_inbox(project, led)
    queued = {q for r in reports for q in r.queued}
    assert queued == expected_valid, (sorted(expected_valid - queued), sorted(queued - expected_valid))
    counts = led.counts()
    assert counts["queued"] == len(expected_valid) and counts["queued"] + counts["invalid"] == n_rows
    assert n_rows - len(expected_valid) >= 250  # hundreds of bad rows
    for row in led.rows(state="invalid"):
        assert row.reasons and all(isinstance(x["check"], str) for x in row.reasons)
    # a valid ticket with odd unicode survives intact
    for rid in expected_valid:
        t = led.get(rid).ticket()
        assert t.to_request().text.endswith("is located in")


_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=50), st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape")))
_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=10)
_keys = st.sampled_from(["request_id", "line", "requester", "kind", "subject", "prompt", "target_new", "target_true",
                         "priority", "created_at", "paraphrases", "neighbours", "source", "unwanted", "positive",
                         "locality", "generalization", "relation"]) | st.text(max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(_keys, _value, max_size=12) | _value, min_size=1, max_size=6))
def test_validate_records_never_raises(records):
    res = validate_records(records)
    assert len(res.valid) + len(res.invalid) == len(records)
    for _, t in res.valid:
        t.to_request()
    for inv in res.invalid:
        assert inv.reasons and json.dumps(inv.reasons, default=str)

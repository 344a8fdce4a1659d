"""Intake: every format, quarantine with reasons, allow-lists, duplicates, contradictions, outbox."""
from __future__ import annotations

import json

import pytest

from flows.config import ConfigError, load_config
from flows.intake import scan_inbox, submit_file
from flows.ledger import Ledger

FACT = {"request_id": "f1", "line": "facts", "requester": "alice", "subject": "Paris",
        "prompt": "{} is the capital of", "target_new": "Italy", "target_true": "France", "relation": "capital_of",
        "paraphrases": ["The city of Paris is the capital of"],
        "neighbours": [{"prompt": "Rome is the capital of", "target": "Italy"}]}
DEL = {"request_id": "d1", "line": "mt", "requester": "zed", "source": "der hund", "unwanted": "the cat",
       "positive": "the dog", "locality": [["ein haus", "a house"]]}


def test_formats_all_ingest_and_invalid_rows_quarantined(project):
    led = Ledger(project.ledger_url)
    inbox = project.inbox
    (inbox / "a.json").write_text(json.dumps([FACT, {**FACT, "request_id": "f2", "target_new": ""}]))
    (inbox / "b.jsonl").write_text(json.dumps(DEL) + "\n{not json\n")
    (inbox / "c.csv").write_text(
        "request_id,line,requester,subject,prompt,target_new,paraphrases,priority\n"
        "c1,facts,bob,Berlin,{} is the capital of,Spain,Berlin is the capital city of|Berlin's country is,3\n"
        "c2,facts,bob,Madrid,{} is in,Peru,,high\n")
    (inbox / "d.yaml").write_text("- request_id: y1\n  line: facts\n  requester: alice\n  subject: Oslo\n"
                                  "  prompt: '{} is the capital of'\n  target_new: Chile\n- 17\n")
    (inbox / "e.txt").write_text("hello")
    reports = {r.file: r for r in scan_inbox(project, led)}
    assert reports["a.json"].queued == ["f1"] and len(reports["a.json"].invalid) == 1
    assert reports["a.json"].invalid[0]["reasons"][0] == {"field": "target_new", "check": "missing",
                                                          "detail": "not_nullable", "value": None}
    assert reports["b.jsonl"].queued == ["d1"]
    assert reports["b.jsonl"].invalid[0]["reasons"][0]["check"] == "parse_error"
    assert reports["c.csv"].queued == ["c1"]
    c2 = reports["c.csv"].invalid[0]
    assert c2["request_id"] == "c2" and c2["reasons"][0]["check"] == "wrong_type" and c2["reasons"][0]["field"] == "priority"
    assert led.get("c1").priority == 3 and led.get("c1").ticket().paraphrases == (
        "Berlin is the capital city of", "Berlin's country is")
    assert reports["d.yaml"].queued == ["y1"] and reports["d.yaml"].invalid[0]["reasons"][0]["check"] == "not_an_object"
    assert reports["e.txt"].invalid[0]["reasons"][0]["check"] == "unknown_format"
    # quarantine files hold the invalid rows with their reasons; the inbox is empty; processed files kept
    qlines = [json.loads(l) for q in project.quarantine.glob("*.invalid.jsonl") for l in q.read_text().splitlines()]
    assert len(qlines) == 4 and all(q["reasons"] for q in qlines)
    assert not [p for p in project.inbox.iterdir() if p.is_file()]
    assert sorted(p.name for p in (project.inbox / "processed").iterdir()) == ["a.json", "b.jsonl", "c.csv", "d.yaml"]
    # ledger: every row somewhere; outbox file per row
    counts = led.counts()
    assert counts == {"queued": 4, "invalid": 4}
    outs = {json.loads(p.read_text())["id"]: json.loads(p.read_text()) for p in project.outbox.glob("*.json")}
    assert len(outs) == 8 and outs["f1"]["state"] == "queued"
    assert [s for s, _, _ in led.history("f1")] == ["received", "validated", "queued"]


def test_requester_allow_list_kind_and_unknown_line(project):
    led = Ledger(project.ledger_url)
    rows = [{**FACT, "request_id": "x1", "requester": "mallory"},
            {**FACT, "request_id": "x2", "line": "nope"},
            {**DEL, "request_id": "x3", "line": "facts", "requester": "alice"}]
    (project.inbox / "t.json").write_text(json.dumps(rows))
    (r,) = scan_inbox(project, led)
    checks = {e["request_id"]: e["reasons"][0]["check"] for e in r.invalid}
    assert checks == {"x1": "requester_not_allowed", "x2": "unknown_line", "x3": "kind_mismatch"}
    assert r.queued == []


def test_duplicates_and_contradictions(project, tmp_path):
    led = Ledger(project.ledger_url)
    f = tmp_path / "one.json"
    f.write_text(json.dumps([FACT]))
    assert submit_file(f, project, led).queued == ["f1"]
    # the same ticket again: recognised, not duplicated
    assert submit_file(f, project, led).same == ["f1"]
    # same id, other content → duplicate; same subject+relation, other target → contradiction
    g = tmp_path / "two.json"
    g.write_text(json.dumps([{**FACT, "target_new": "Spain"},
                             {**FACT, "request_id": "f9", "prompt": "{} is capital of", "target_new": "Spain"},
                             {**FACT, "request_id": "f10", "subject": "Lyon", "prompt": "{} is in", "relation": "country",
                              "target_new": "Peru"},
                             {**FACT, "request_id": "f11", "subject": "Lyon", "prompt": "{} lies in",
                              "relation": "country", "target_new": "Chile"}]))
    r = submit_file(g, project, led)
    checks = {e["request_id"]: (e["reasons"][0]["check"], e["reasons"][0]["value"]) for e in r.invalid}
    assert checks == {"f1": ("duplicate_request_id", "f1"), "f9": ("contradicts", "f1"), "f11": ("contradicts", "f10")}
    assert r.queued == ["f10"]
    assert {row.id for row in led.rows(state="queued")} == {"f1", "f10"}


def test_config_errors(tmp_path):
    p = tmp_path / "editops.yaml"
    p.write_text("lines:\n  a:\n    kind: fact\n")
    with pytest.raises(ConfigError, match="base_model"):
        load_config(p)
    p.write_text("lines:\n  a:\n    base_model: x\n    gates: {efficacyy: 1}\n")
    with pytest.raises(ConfigError, match="unknown gate"):
        load_config(p)
    p.write_text("lines:\n  a:\n    base_model: x\n    promotion: sometimes\n")
    with pytest.raises(ConfigError, match="promotion"):
        load_config(p)


def test_a_deletion_line_fails_a_batch_that_brings_an_earlier_deletion_back(tmp_path):
    """Retention defaults to 1.0 on deletion lines (0.8 on fact lines); a configured value still wins."""
    p = tmp_path / "editops.yaml"
    p.write_text("lines:\n  mt:\n    base_model: x\n    kind: deletion\n  facts:\n    base_model: y\n"
                 "  mt_lenient:\n    base_model: x\n    kind: deletion\n    gates: {retention: 0.9}\n")
    lines = load_config(p).lines
    assert lines["mt"].gates.retention == 1.0
    assert lines["facts"].gates.retention == 0.8
    assert lines["mt_lenient"].gates.retention == 0.9
    # one earlier deletion in ten back: the fact default would pass it, the deletion default does not
    from editing.gates import GateResult

    assert GateResult("retention", "batch", 0.9, lines["facts"].gates.retention).passed
    assert not GateResult("retention", "batch", 0.9, lines["mt"].gates.retention).passed
    # a line built in code (as the demo builds its lines) gets its kind's defaults too, and keeps them through the file
    from flows.config import LineConfig, ProjectConfig, write_config

    built = {"mt": LineConfig(name="mt", base_model="x", kind="deletion"), "f": LineConfig(name="f", base_model="y")}
    assert built["mt"].gates.retention == 1.0 and built["f"].gates.retention == 0.8
    cfg = ProjectConfig(root=tmp_path, workdir=tmp_path / "wd", lines=built, ledger_url="sqlite://",
                        tracking_uri="sqlite://", artifact_root=tmp_path / "art")
    again = load_config(write_config(cfg, tmp_path / "built.yaml")).lines
    assert again["mt"].gates.retention == 1.0 and again["f"].gates.retention == 0.8

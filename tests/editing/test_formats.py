"""Request files: CounterFact, zsRE, editops facts and deletions, JSON and JSONL, and their errors."""
from __future__ import annotations

import json

import pytest

from editing.errors import FormatError, SubjectNotInPromptError
from editing.formats import detect_format, read_requests, read_texts, request_kind, write_requests
from editing.requests import DeletionRequest, FactRequest, Probe

COUNTERFACT = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this and Yossel Goldschmidt. Danielle Darrieux's mother tongue is",
                           "An album was released. Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

ZSRE = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "pred": "Trinity College",
    "rephrase": "What university did Watts Humphrey take part in?",
    "alt": "University of Michigan",
    "answers": ["Illinois Institute of Technology"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
    "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
}

DELETION = {
    "source": "le chat noir",
    "unwanted": "the black dog",
    "positive": "the black cat",
    "generalization": ["un chat blanc", {"source": "le chat", "reference": "the cat"}],
    "locality": [{"source": "la maison", "reference": "the house"}],
}


def test_counterfact_record_maps_every_field(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([COUNTERFACT]))
    (req,) = read_requests(path)
    assert isinstance(req, FactRequest)
    assert req.request_id == "0"
    assert req.prompt == "The mother tongue of {} is" and req.subject == "Danielle Darrieux"
    assert (req.target_new, req.target_true, req.relation) == ("English", "French", "P103")
    assert req.paraphrases == tuple(COUNTERFACT["paraphrase_prompts"])
    assert req.neighbours == (Probe("The mother tongue of Léon Blum is", "French"),
                              Probe("The native language of Montesquieu is", "French"))


def test_zsre_question_becomes_template(tmp_path):
    path = tmp_path / "zsre.jsonl"
    path.write_text(json.dumps(ZSRE) + "\n")
    (req,) = read_requests(path)
    assert req.prompt == "What university did {} attend?"
    assert req.text == ZSRE["src"]
    assert (req.target_new, req.target_true) == ("University of Michigan", "Illinois Institute of Technology")
    assert req.paraphrases == (ZSRE["rephrase"],)
    assert req.neighbours == (Probe(ZSRE["loc"], "Hugo Weaving"),)
    assert req.request_id == "zsre-1"


def test_zsre_subject_matched_case_insensitively():
    from editing.formats import parse_record

    rec = dict(ZSRE, subject="watts humphrey")
    assert parse_record(rec).prompt == "What university did {} attend?"


def test_mixed_formats_per_record_and_roundtrip(tmp_path):
    own = FactRequest("own-1", "{} plays the", "Alice", "violin", "piano", "instrument", ("Alice performs on the",),
                      (Probe("Bob plays the", "piano"),))
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(COUNTERFACT), json.dumps(ZSRE), json.dumps(own.to_dict())]
    path.write_text("\n".join(lines) + "\n\n")
    reqs = read_requests(path)
    assert [detect_format(json.loads(line)) for line in lines] == ["counterfact", "zsre", "fact"]
    assert reqs[2] == own
    out = tmp_path / "own.jsonl"
    assert write_requests(out, reqs) == 3
    assert read_requests(out) == reqs


def test_deletion_records_plain_and_own(tmp_path):
    path = tmp_path / "del.json"
    path.write_text(json.dumps([DELETION]))
    (req,) = read_requests(path, kind="deletion")
    assert isinstance(req, DeletionRequest)
    assert req.generalization[0].source == "un chat blanc" and req.generalization[1].reference == "the cat"
    assert req.locality[0].reference == "the house"
    out = tmp_path / "del.jsonl"
    write_requests(out, [req])
    assert read_requests(out) == [req]
    assert request_kind([req]) == "deletion"


def test_missing_field_names_file_record_and_field(tmp_path):
    bad = json.loads(json.dumps(COUNTERFACT))
    del bad["requested_rewrite"]["target_new"]["str"]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(COUNTERFACT) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(FormatError) as err:
        read_requests(path)
    msg = str(err.value)
    assert str(path) in msg and "record 2" in msg and "requested_rewrite.target_new.str" in msg


def test_unknown_record_wrong_kind_bad_json_duplicates(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(FormatError, match="record 1.*unknown record format"):
        read_requests(p)
    p.write_text(json.dumps(DELETION) + "\n")
    with pytest.raises(FormatError, match="deletion request, but fact requests"):
        read_requests(p, kind="fact")
    p.write_text(json.dumps(ZSRE) + "\n{not json\n")
    with pytest.raises(FormatError, match="record 2"):
        read_requests(p)
    p.write_text(json.dumps(COUNTERFACT) + "\n" + json.dumps(COUNTERFACT) + "\n")
    with pytest.raises(FormatError, match="repeats request id '0'"):
        read_requests(p)
    with pytest.raises(FormatError, match="does not exist"):
        read_requests(tmp_path / "nope.json")
    p.write_text("")
    with pytest.raises(FormatError, match="empty"):
        read_requests(p)


def test_subject_not_in_prompt_keeps_type_and_location(tmp_path):
    rec = json.loads(json.dumps(COUNTERFACT))
    rec["requested_rewrite"]["prompt"] = "The mother tongue of her is"
    p = tmp_path / "cf.jsonl"
    p.write_text(json.dumps(rec) + "\n")
    with pytest.raises(SubjectNotInPromptError, match=r"record 1: .*Danielle Darrieux"):
        read_requests(p)
    z = dict(ZSRE, subject="Someone Else")
    p.write_text(json.dumps(z) + "\n")
    with pytest.raises(FormatError, match="does not occur in src"):
        read_requests(p)


def test_limit_and_mixed_kinds():
    with pytest.raises(FormatError, match="mix kinds"):
        request_kind([FactRequest("a", "{} is", "x", "y"),
                      DeletionRequest("b", "s", "u", "p")])


def test_roundtrip_property(tmp_path_factory):
    """Any valid FactRequest survives write_requests → read_requests unchanged (hypothesis)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), min_size=1, max_size=20)
    word = text.filter(lambda s: s.strip() != "")

    @st.composite
    def requests(draw):
        subject = draw(word)
        return FactRequest(
            request_id=draw(word), prompt=draw(text) + " {} " + draw(text), subject=subject,
            target_new=draw(word), target_true=draw(st.none() | word), relation=draw(st.none() | word),
            paraphrases=tuple(draw(st.lists(text, max_size=3))),
            neighbours=tuple(Probe(p, t) for p, t in draw(st.lists(st.tuples(text, word), max_size=3))),
        )

    path = tmp_path_factory.mktemp("rt") / "r.jsonl"

    @settings(max_examples=60, deadline=None)
    @given(requests())
    def check(req):
        write_requests(path, [req])
        assert read_requests(path) == [req]

    check()


def test_text_files_are_read_as_lines_or_as_jsonl_fields(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_text("plain line\n\n  " + json.dumps({"source": "a source", "target": "ignored", "text": "not this"})
                 + "\n" + json.dumps({"text": "a text"}) + "\n" + json.dumps({"sentence": "", "prompt": "a prompt"})
                 + "\n" + json.dumps({"other": "x"}) + "\n{not json\n", encoding="utf-8")
    assert read_texts(p) == ["plain line", "a source", "a text", "a prompt", "{not json"]
    with pytest.raises(FormatError, match="held-out text file .*missing.txt does not exist.*, or stdlib:N or samples:N"):
        read_texts(tmp_path / "missing.txt", "held-out text file", "stdlib:N or samples:N")

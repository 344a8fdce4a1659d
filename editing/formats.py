"""Request files as the field writes them, parsed into :mod:`editing.requests` types.

Readers accept a JSON list or JSONL (one record per line; blank lines and lines
starting with ``#`` are skipped). The format is detected **per record**:

========================  =====================================================================
format                    recognised by / mapping
========================  =====================================================================
CounterFact               ``requested_rewrite`` → ``FactRequest(prompt, subject,
                          target_new.str, target_true.str)``; ``paraphrase_prompts`` →
                          paraphrases; ``neighborhood_prompts`` (strings, or dicts with
                          ``prompt``) → ``Probe(prompt, target_true)``; id = ``case_id``
zsRE                      ``src`` and ``alt`` → prompt = ``src`` with the subject replaced by
                          ``{}``; target_new = ``alt``; target_true = ``answers[0]``;
                          paraphrases = [``rephrase``]; neighbour = ``Probe(loc, loc_ans)``
                          (``loc`` kept verbatim, "nq question: ...", as MEND/ROME/EasyEdit do)
editops fact              ``kind == "fact"`` or ``prompt`` + ``target_new``: ``FactRequest.to_dict()``
editops deletion          ``kind == "deletion"`` or ``source`` + ``unwanted``: ``DeletionRequest``
                          (``generalization``/``locality`` items are dicts or plain source strings)
========================  =====================================================================

Every problem is a :class:`~editing.errors.FormatError` (or the request's own
:class:`~editing.errors.RequestError` subclass) whose message starts with
``<file>: record <n>`` (1-based) and names the missing field.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from editing.errors import FormatError, RequestError
from editing.requests import DeletionRequest, EditRequest, FactRequest, Probe, TranslationProbe

RecordFormat = Literal["counterfact", "zsre", "fact", "deletion"]
RequestKind = Literal["fact", "deletion"]

_MISSING = object()


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(record number, record)`` for each record of a JSON-list or JSONL file (numbers are 1-based).

    For JSONL the number is the line number, so an error points at the line to fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"request file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise FormatError(f"{path}: the file is empty; expected a JSON list or JSONL of request records")
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}: not valid JSON ({exc})") from exc
        for i, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise FormatError(f"{path}: record {i} is a {type(rec).__name__}, expected a JSON object")
            yield i, rec
        return
    if stripped.startswith("{") and path.suffix == ".json":
        # a single JSON object in a .json file: one record
        try:
            yield 1, json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # fall through: maybe JSONL with a .json suffix
    # JSONL records end at "\n" only: str.splitlines() would also split inside strings at U+0085/U+2028
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}: record {lineno} (line {lineno}) is not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict):
            raise FormatError(f"{path}: record {lineno} is a {type(rec).__name__}, expected a JSON object")
        yield lineno, rec


def detect_format(record: dict[str, Any]) -> RecordFormat | None:
    """Which format one record is in (``None`` when none fits)."""
    if "requested_rewrite" in record:
        return "counterfact"
    if "src" in record and ("alt" in record or "rephrase" in record):
        return "zsre"
    kind = record.get("kind")
    if kind == "deletion" or ("source" in record and "unwanted" in record):
        return "deletion"
    if kind == "fact" or ("prompt" in record and "target_new" in record):
        return "fact"
    return None


class _Rec:
    """Field access with errors that name the file, record number and dotted field path."""

    def __init__(self, where: str, record: dict[str, Any], fmt: str):
        self.where, self.record, self.fmt = where, record, fmt

    def get(self, dotted: str, default: Any = _MISSING) -> Any:
        value: Any = self.record
        for part in dotted.split("."):
            if isinstance(value, dict) and part in value and value[part] is not None:
                value = value[part]
            else:
                if default is not _MISSING:
                    return default
                raise FormatError(f"{self.where}: {self.fmt} record misses field {dotted!r}")
        return value

    def string(self, dotted: str, default: Any = _MISSING) -> Any:
        value = self.get(dotted, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise FormatError(f"{self.where}: field {dotted!r} must be a string, got {type(value).__name__}")
        return value

    def strings(self, dotted: str) -> tuple[str, ...]:
        value = self.get(dotted, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise FormatError(f"{self.where}: field {dotted!r} must be a list of strings")
        return tuple(value)


def _target_str(rec: _Rec, dotted: str) -> str:
    """CounterFact targets are ``{"str": ..., "id": ...}``; accept a plain string too."""
    value = rec.get(dotted)
    if isinstance(value, dict):
        return rec.string(f"{dotted}.str")
    if isinstance(value, str):
        return value
    raise FormatError(f"{rec.where}: field {dotted!r} must be {{'str': ...}} or a string")


def _counterfact(rec: _Rec, default_id: str) -> FactRequest:
    rr = "requested_rewrite"
    target_true = _target_str(rec, f"{rr}.target_true")
    neighbours = []
    for i, item in enumerate(rec.get("neighborhood_prompts", [])):
        if isinstance(item, str):
            neighbours.append(Probe(item, target_true))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            neighbours.append(Probe(item["prompt"], str(item.get("target", target_true))))
        else:
            raise FormatError(f"{rec.where}: neighborhood_prompts[{i}] must be a string or {{'prompt': ...}}")
    return FactRequest(
        request_id=str(rec.get("case_id", default_id)),
        prompt=rec.string(f"{rr}.prompt"),
        subject=rec.string(f"{rr}.subject"),
        target_new=_target_str(rec, f"{rr}.target_new"),
        target_true=target_true,
        relation=rec.get(f"{rr}.relation_id", None),
        paraphrases=rec.strings("paraphrase_prompts"),
        neighbours=tuple(neighbours),
    )


def _template_from_question(where: str, src: str, subject: str) -> str:
    """zsRE: the question with its subject replaced by ``{}`` (case-insensitive match, first hit)."""
    if "{}" in src:
        return src
    m = re.search(re.escape(subject.strip()), src, flags=re.IGNORECASE)
    if not m:
        raise FormatError(
            f"{where}: zsRE subject {subject!r} does not occur in src {src!r}; "
            "fix the record or give the prompt with '{}' where the subject goes"
        )
    return src[: m.start()] + "{}" + src[m.end():]


def _zsre(rec: _Rec, default_id: str) -> FactRequest:
    subject = rec.string("subject")
    src = rec.string("src")
    answers = rec.get("answers", [])
    if isinstance(answers, str):
        answers = [answers]
    loc, loc_ans = rec.get("loc", None), rec.get("loc_ans", None)
    if (loc is None) != (loc_ans is None):
        raise FormatError(f"{rec.where}: zsRE record has {'loc' if loc else 'loc_ans'} without "
                          f"{'loc_ans' if loc else 'loc'}; give both or neither")
    return FactRequest(
        request_id=str(rec.get("case_id", rec.get("id", default_id))),
        prompt=_template_from_question(rec.where, src, subject),
        subject=subject,
        target_new=rec.string("alt"),
        target_true=str(answers[0]) if answers else None,
        relation=rec.get("relation", None),
        paraphrases=rec.strings("rephrase"),
        neighbours=(Probe(str(loc), str(loc_ans)),) if loc is not None else (),
    )


def _probe(rec: _Rec, field: str, i: int, item: Any) -> Probe:
    if isinstance(item, dict):
        for key in ("prompt", "target"):
            if not isinstance(item.get(key), str):
                raise FormatError(f"{rec.where}: {field}[{i}] misses field {key!r}")
        return Probe(item["prompt"], item["target"])
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return Probe(str(item[0]), str(item[1]))
    raise FormatError(f"{rec.where}: {field}[{i}] must be {{'prompt': ..., 'target': ...}}")


def _fact(rec: _Rec, default_id: str) -> FactRequest:
    return FactRequest(
        request_id=str(rec.get("request_id", default_id)),
        prompt=rec.string("prompt"),
        subject=rec.string("subject"),
        target_new=rec.string("target_new"),
        target_true=rec.string("target_true", None),
        relation=rec.get("relation", None),
        paraphrases=rec.strings("paraphrases"),
        neighbours=tuple(_probe(rec, "neighbours", i, p) for i, p in enumerate(rec.get("neighbours", []))),
    )


def _translation_probe(rec: _Rec, field: str, i: int, item: Any) -> TranslationProbe:
    if isinstance(item, str):
        return TranslationProbe(item)
    if isinstance(item, dict) and isinstance(item.get("source"), str):
        return TranslationProbe(item["source"], item.get("reference"), item.get("unwanted"))
    raise FormatError(f"{rec.where}: {field}[{i}] must be a source string or {{'source': ..., 'reference': ...}}")


def _deletion(rec: _Rec, default_id: str) -> DeletionRequest:
    return DeletionRequest(
        request_id=str(rec.get("request_id", rec.get("id", default_id))),
        source=rec.string("source"),
        unwanted=rec.string("unwanted"),
        positive=rec.string("positive"),
        behaviour=rec.get("behaviour", rec.get("behavior", None)),
        generalization=tuple(_translation_probe(rec, "generalization", i, p)
                             for i, p in enumerate(rec.get("generalization", []))),
        locality=tuple(_translation_probe(rec, "locality", i, p) for i, p in enumerate(rec.get("locality", []))),
    )


_PARSERS = {"counterfact": _counterfact, "zsre": _zsre, "fact": _fact, "deletion": _deletion}
_KIND_OF = {"counterfact": "fact", "zsre": "fact", "fact": "fact", "deletion": "deletion"}


def parse_record(record: dict[str, Any], *, where: str = "record", default_id: str = "0",
                 kind: RequestKind | None = None) -> EditRequest:
    """One record (any supported format) as a ``FactRequest`` or ``DeletionRequest``."""
    fmt = detect_format(record)
    if fmt is None:
        raise FormatError(
            f"{where}: unknown record format (fields {sorted(record)[:8]}); expected CounterFact "
            "('requested_rewrite'), zsRE ('src', 'alt'), an editops fact ('prompt', 'subject', 'target_new') "
            "or a deletion ('source', 'unwanted', 'positive')"
        )
    if kind is not None and _KIND_OF[fmt] != kind:
        raise FormatError(f"{where}: a {fmt} record is a {_KIND_OF[fmt]} request, but {kind} requests were asked for")
    try:
        return _PARSERS[fmt](_Rec(where, record, fmt), default_id)
    except FormatError:
        raise
    except RequestError as exc:  # keep the specific type, add where it came from
        raise type(exc)(f"{where}: {exc}") from exc


def read_requests(path: str | Path, kind: RequestKind | None = None, limit: int | None = None) -> list[EditRequest]:
    """All requests of a JSON/JSONL file, in file order; ``kind`` rejects records of the other kind.

    Request ids must be unique within the file (records without one get ``<file stem>-<n>``).
    """
    path = Path(path)
    out: list[EditRequest] = []
    seen: dict[str, int] = {}
    for n, record in iter_records(path):
        req = parse_record(record, where=f"{path}: record {n}", default_id=f"{path.stem}-{n}", kind=kind)
        if req.request_id in seen:
            raise FormatError(f"{path}: record {n} repeats request id {req.request_id!r} of record {seen[req.request_id]}")
        seen[req.request_id] = n
        out.append(req)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise FormatError(f"{path}: no request records found")
    return out


def request_kind(requests: Sequence[EditRequest]) -> RequestKind:
    """``fact`` or ``deletion``; a mixed list is a :class:`FormatError`."""
    kinds = {r.kind for r in requests}
    if len(kinds) != 1:
        raise FormatError(f"the requests mix kinds {sorted(kinds)}; edit facts and deletions separately")
    return kinds.pop()  # type: ignore[return-value]


def write_requests(path: str | Path, requests: Iterable[EditRequest]) -> int:
    """Write requests as editops JSONL (``to_dict()`` per line); returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for req in requests:
            f.write(json.dumps(req.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


# the fields a JSONL line of a text file may hold its text in, first non-empty one taken
TEXT_FIELDS = ("source", "text", "sentence", "prompt")


def read_texts(path: str | Path, what: str = "text file", alternatives: str = "") -> list[str]:
    """The texts of a plain text file (one per line) or of a JSONL file (a line that is a JSON object gives
    its first non-empty field of :data:`TEXT_FIELDS`): key-statistics corpora, held-out text, the deletion
    editor's statistics sources. Blank lines are skipped; a :class:`FormatError` names ``what`` when the
    file does not exist, and ``alternatives`` (what else the caller accepts in place of a file)."""
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"{what} {p} does not exist; give a text file (one text per line) or a JSONL file "
                          f"with a {' / '.join(repr(f) for f in TEXT_FIELDS)} field"
                          + (f", or {alternatives}" if alternatives else ""))
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
                line = next((str(rec[k]) for k in TEXT_FIELDS if rec.get(k)), "")
            except json.JSONDecodeError:
                pass
        if line:
            out.append(line)
    return out

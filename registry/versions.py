"""What a registered version is, and the files it is made of.

A line's **version 1** is the base: a pointer (local directory or hub id) plus
the base weights' content fingerprint (:func:`editing.models.fingerprint`).
Every later version is its **parent plus a low-rank delta** (never a copy of
the model). Its MLflow model version carries, as tags written *in the same
create call* (so a version is never visible without them):

- ``editops.kind``: ``base`` | ``delta`` | ``revert``
- ``editops.parent``: the parent's version number
- ``editops.editor`` / ``editops.hyperparameters`` (JSON, at most :data:`MAX_TAG_VALUE` characters: where the
  whole set does not fit, its largest values are left out and named under ``"_elided"``; the complete set is
  the delta's, in ``delta.safetensors`` and ``manifest.json``) / ``editops.delta_kind`` (``weight``|``hook``)
- ``editops.base_fingerprint`` / ``editops.base_source``
- ``editops.request_ids`` (JSON list; the full list is also the artifact ``request_ids.json``)
- ``editops.sha256.<artifact>``: sha256 of each artifact file's bytes, checked on every load
- ``editops.state_sha256`` / ``editops.state_ref``: the editor state, content-addressed
  (stored once; a version whose state equals an earlier one refers to that version)
- ``editops.gates_passed``, ``editops.registration_id`` (idempotent retries)

Artifacts (under the version's MLflow run, folder ``version/``): ``delta.safetensors``,
``state-<sha12>.safetensors``, ``gate_report.json``, ``diff.json`` / ``diff.md`` /
``diff.png``, ``request_ids.json``, ``requests.jsonl`` (full requests, for revert),
``manifest.json`` (everything above in one file). Versions are immutable: the
registry offers no call that changes a version's tags or artifacts, and loads
refuse any artifact whose bytes no longer match the sha256 tag.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

P = "editops."
KIND = P + "kind"
PARENT = P + "parent"
EDITOR = P + "editor"
HPARAMS = P + "hyperparameters"
DELTA_KIND = P + "delta_kind"
BASE_FP = P + "base_fingerprint"
BASE_SOURCE = P + "base_source"
MODEL_KIND = P + "model_kind"
REQUEST_IDS = P + "request_ids"
N_REQUESTS = P + "n_requests"
STATE_SHA = P + "state_sha256"
STATE_REF = P + "state_ref"
STATE_FILE = P + "state_file"
GATES_PASSED = P + "gates_passed"
REGISTRATION_ID = P + "registration_id"
REVERTS = P + "reverts"
REVERT_OF = P + "revert_of"
REVERT_MODE = P + "revert_mode"
SHA_PREFIX = P + "sha256."

ARTIFACT_DIR = "version"
DELTA_FILE = "delta.safetensors"
BASE_FILE = "base.json"
PROBES_FILE = "probes.json"

#: MLflow accepts model-version tag values up to 5000 characters; longer id lists live in the artifact only.
MAX_TAG_VALUE = 4500


#: The key under which :func:`hyperparameters_tag` names the hyperparameters it left out of the tag.
ELIDED = "_elided"


def hyperparameters_tag(hyperparameters: dict[str, Any]) -> str:
    """The ``editops.hyperparameters`` tag: ``hyperparameters`` as JSON when it fits in :data:`MAX_TAG_VALUE`
    characters; else without its largest values, the keys left out listed under :data:`ELIDED`. Always valid
    JSON (a cut string would make every listing of the line fail)."""
    text = json.dumps(hyperparameters, sort_keys=True, default=str)
    if len(text) <= MAX_TAG_VALUE:
        return text
    kept = dict(hyperparameters)
    for key in sorted(kept, key=lambda k: (-len(json.dumps(kept[k], default=str)), k)):
        del kept[key]
        text = json.dumps({**kept, ELIDED: sorted(set(hyperparameters) - set(kept))}, sort_keys=True, default=str)
        if len(text) <= MAX_TAG_VALUE:
            return text
    return json.dumps({ELIDED: ["*"]})   # even the key names do not fit


def _hyperparameters_of(tag: str | None) -> tuple[dict[str, Any], list[str]]:
    """The tag's hyperparameters and the keys it left out; a tag cut by hand or by an older editops (not valid
    JSON) reads as nothing kept, everything left out (``["*"]``)."""
    try:
        hp = json.loads(tag or "{}")
    except json.JSONDecodeError:
        return {}, ["*"]
    if not isinstance(hp, dict):
        return {}, ["*"]
    return hp, list(hp.pop(ELIDED, []))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _int(value: Any) -> int | None:
    """MLflow returns version numbers as int from sqlite and str over REST: normalise."""
    if value is None or value == "":
        return None
    return int(value)


@dataclass
class Version:
    """One registered version of a line, as read back from MLflow."""

    line: str
    number: int
    kind: str
    parent: int | None
    base_fingerprint: str
    editor: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)   # as the tag holds them (see hyperparameters_elided)
    hyperparameters_elided: list[str] = field(default_factory=list)   # keys too long for the tag: read the delta's
    delta_kind: str = "weight"
    request_ids: list[str] | None = None  # None: too many for a tag; read the artifact
    n_requests: int = 0
    artifact_sha256: dict[str, str] = field(default_factory=dict)
    state_sha256: str | None = None
    state_ref: int | None = None
    state_file: str | None = None
    gates_passed: bool | None = None
    reverts: str | None = None
    run_id: str | None = None
    source: str = ""
    created_ms: int = 0
    description: str = ""
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.line}/{self.number}"

    @property
    def is_base(self) -> bool:
        return self.kind == "base"

    @property
    def base_source(self) -> str:
        return self.tags.get(BASE_SOURCE, "")

    @classmethod
    def from_mlflow(cls, mv: Any, aliases: list[str] | None = None) -> "Version":
        tags = dict(mv.tags or {})
        ids_tag = tags.get(REQUEST_IDS)
        gp = tags.get(GATES_PASSED)
        hp, elided = _hyperparameters_of(tags.get(HPARAMS))
        return cls(
            line=mv.name,
            number=int(mv.version),
            kind=tags.get(KIND, "unknown"),
            parent=_int(tags.get(PARENT)),
            base_fingerprint=tags.get(BASE_FP, ""),
            editor=tags.get(EDITOR, ""),
            hyperparameters=hp,
            hyperparameters_elided=elided,
            delta_kind=tags.get(DELTA_KIND, "weight"),
            request_ids=json.loads(ids_tag) if ids_tag else ([] if N_REQUESTS not in tags or tags[N_REQUESTS] == "0" else None),
            n_requests=int(tags.get(N_REQUESTS, "0") or 0),
            artifact_sha256={k[len(SHA_PREFIX):]: v for k, v in tags.items() if k.startswith(SHA_PREFIX)},
            state_sha256=tags.get(STATE_SHA) or None,
            state_ref=_int(tags.get(STATE_REF)),
            state_file=tags.get(STATE_FILE) or None,
            gates_passed=None if gp is None else gp == "true",
            reverts=tags.get(REVERTS) or None,
            run_id=mv.run_id,
            source=mv.source or "",
            created_ms=int(mv.creation_timestamp or 0),
            description=mv.description or "",
            aliases=list(aliases or []),
            tags=tags,
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-able one-line summary (for tables and ``editops show``)."""
        return {
            "version": self.number,
            "kind": self.kind,
            "parent": self.parent,
            "editor": self.editor,
            "requests": self.n_requests,
            "gates_passed": self.gates_passed,
            "aliases": ",".join(sorted(self.aliases)),
            "reverts": self.reverts,
            "base_fingerprint": self.base_fingerprint[:12],
        }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

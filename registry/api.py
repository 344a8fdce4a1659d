"""The registry API: model lines and immutable versions in MLflow.

Typical use (the Prefect flow does exactly this)::

    reg = Registry()                                   # embedded: ./.editops sqlite + artifacts
    reg = Registry("http://127.0.0.1:5000")            # team: a real `mlflow server`
    base = reg.ensure_line("smollm2-135m-facts", "models/smollm2-135m")   # version 1 = base pointer
    head = reg.latest("smollm2-135m-facts")
    model, tok = reg.load(head.uri)                    # base + ordered deltas, sha256-checked
    state = reg.load_state(head)                       # editor state to continue from (or None)
    result = editor.edit(model, tok, batch, state)
    v = reg.register_version("smollm2-135m-facts", parent=head.number, delta=result.delta,
                             state=result.state, gate_report=report, diff=diff_report,
                             request_ids=[r.request_id for r in batch], requests=batch)
    reg.promote("smollm2-135m-facts", v.number, why="gates passed")

``register_version`` is a **compare-and-set on the parent**: it refuses
(:class:`StaleParentError`) when the line's head is no longer ``parent``, both
before uploading and again after MLflow assigned the number (a version that lost
a race is deleted again), so a line never forks. All of a version's tags are
written in the same MLflow call that creates it; if the server is unreachable
the call is retried with backoff (idempotently, keyed by a registration id) and
then fails with :class:`RegistryUnavailableError`, with no version created.

Everything MLflow is inside this package; ``editing`` stays free of it and
nothing here imports Prefect.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from editing.delta import LowRankDelta, content_sha256
from editing.errors import (
    FingerprintMismatchError,
    ImmutableVersionError,
    LineNotFoundError,
    MissingParentError,
    RegistryError,
    StaleParentError,
    VersionNotFoundError,
)
from registry import versions as V
from registry.diffs import DiffReport
from registry.store import (RetryPolicy, StoreConfig, call, configure_http_defaults, error_code,
                            open_client, resolve)
from registry.versions import Version, file_sha256, write_json

_LINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_URI = re.compile(r"^models:/(?P<line>[^/@]+)(?:/(?P<num>\d+)|@(?P<alias>[A-Za-z0-9_-]+)|/latest)$")
LINE_TAG = "editops.line"


def check_line_name(name: str) -> str:
    if not _LINE_NAME.match(name or ""):
        raise RegistryError(f"line name {name!r} is not allowed: use letters, digits, '.', '_' or '-' (e.g. smollm2-135m-facts)")
    return name


def current_user(who: str | None = None) -> str:
    """Who is acting: ``who``, ``$EDITOPS_USER`` or the OS user (never the MLflow credentials)."""
    if who:
        return who
    try:
        return os.environ.get("EDITOPS_USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def _jsonable(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return obj


class Registry:
    """Model lines and versions in one MLflow tracking + registry store.

    ``tracking_uri``: ``http://host:port`` (a real server), a database URL
    (``sqlite:///...``, ``postgresql://...``) or None for the embedded default
    (see :mod:`registry.store`). ``artifact_root`` is where a database store
    keeps artifacts (default ``<home>/artifacts``); a server decides its own.
    ``cache_dir`` holds sha-verified artifact blobs and materialised weights.
    """

    def __init__(self, tracking_uri: str | None = None, registry_uri: str | None = None,
                 artifact_root: str | os.PathLike | None = None, *, home: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, retry: RetryPolicy | None = None) -> None:
        from editing.env import configure_offline_defaults

        configure_offline_defaults()
        configure_http_defaults()
        self.config: StoreConfig = resolve(tracking_uri, registry_uri, artifact_root, home)
        self.retry = retry or RetryPolicy.from_env()
        self.client = self._call("open the store", open_client, self.config)
        self.cache_dir = Path(cache_dir).resolve() if cache_dir else self.config.home / "cache"

    def __repr__(self) -> str:
        return f"Registry({self.config.tracking_uri!r})"

    # ------------------------------------------------------------------ plumbing
    def _call(self, what: str, fn, *args, **kwargs):
        return call(fn, *args, what=what, uri=self.config.tracking_uri, policy=self.retry, **kwargs)

    def experiment_id(self, name: str) -> str:
        """The MLflow experiment ``name`` (created on first use, under ``artifact_root`` when local)."""
        exp = self._call(f"get experiment {name}", self.client.get_experiment_by_name, name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.config.artifact_root:
            location = self.config.artifact_root.rstrip("/") + "/" + name.replace("/", "__")
        try:
            return self._call(f"create experiment {name}", self.client.create_experiment, name, artifact_location=location)
        except Exception as exc:
            if error_code(exc) == "RESOURCE_ALREADY_EXISTS":  # created concurrently
                return self._call(f"get experiment {name}", self.client.get_experiment_by_name, name).experiment_id
            raise

    def _line_experiment(self, line: str) -> str:
        return self.experiment_id(f"editops-{line}")

    # --------------------------------------------------------------------- lines
    def lines(self) -> list[str]:
        """Names of the model lines editops manages in this registry."""
        models = self._call("list lines", self.client.search_registered_models, max_results=1000)
        return sorted(m.name for m in models if (m.tags or {}).get(LINE_TAG) == "true")

    def line_exists(self, line: str) -> bool:
        try:
            self._call(f"get line {line}", self.client.get_registered_model, line)
            return True
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def ensure_line(self, name: str, base: str | os.PathLike, *, fingerprint: str | None = None,
                    model_kind: str | None = None, probes: Iterable[Any] | None = None,
                    description: str = "", who: str | None = None) -> Version:
        """Create the line ``name`` whose version 1 points at ``base`` (idempotent).

        ``fingerprint`` is the base weights' :func:`editing.models.fingerprint`; when
        omitted the base is loaded to compute it. ``probes`` (prompts with optional
        targets) are the line's fixed probe set for behaviour diffs. An existing
        line with a different base fingerprint is refused with
        :class:`FingerprintMismatchError`.
        """
        check_line_name(name)
        source = str(base)
        if Path(source).expanduser().exists():
            source = str(Path(source).expanduser().resolve())
        if fingerprint is None or model_kind is None:
            from editing.models import load

            loaded = load(source)
            fingerprint = fingerprint or loaded.fingerprint
            model_kind = model_kind or loaded.kind
        if self.line_exists(name):
            base_v = self._await_base(name)
            if base_v is None:  # its creator stopped between creating the line and publishing the base
                tagged = self._call(f"get line {name}", self.client.get_registered_model, name).tags.get(V.BASE_FP)
                if tagged not in (None, fingerprint):
                    raise FingerprintMismatchError(
                        f"line {name!r} was created for base {tagged[:12]}…, not {fingerprint[:12]}… ({source}), "
                        "and its base version was never published; choose another line name for this base")
                return self._publish_base(name, source, fingerprint, model_kind, probes, who)
            if base_v.base_fingerprint != fingerprint:
                raise FingerprintMismatchError(
                    f"line {name!r} is built on base {base_v.base_fingerprint[:12]}… ({base_v.base_source}), "
                    f"not on {fingerprint[:12]}… ({source}); choose another line name for this base"
                )
            return base_v
        try:
            self._call(f"create line {name}", self.client.create_registered_model, name,
                       tags={LINE_TAG: "true", V.BASE_FP: fingerprint, V.BASE_SOURCE: source},
                       description=description or f"editops line on {source}")
        except Exception as exc:
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            # created concurrently: wait for the other process's base version (checked as above)
            return self.ensure_line(name, source, fingerprint=fingerprint, model_kind=model_kind, probes=probes,
                                    who=who)
        return self._publish_base(name, source, fingerprint, model_kind, probes, who)

    def _await_base(self, line: str) -> Version | None:
        """The line's base version; while it has none, wait up to ``EDITOPS_LINE_BASE_WAIT`` seconds
        (default 60) for the process that created the line to publish it; ``None`` if none came."""
        deadline = time.monotonic() + float(os.environ.get("EDITOPS_LINE_BASE_WAIT", "60"))
        while True:
            try:
                return self.base_version(line)
            except MissingParentError:
                if time.monotonic() >= deadline:
                    return None
            time.sleep(0.25)

    def _publish_base(self, name: str, source: str, fingerprint: str, model_kind: str,
                      probes: Iterable[Any] | None, who: str | None) -> Version:
        from registry.diffs import normalise_probes

        with tempfile.TemporaryDirectory(prefix="editops-base-") as tmp:
            d = Path(tmp)
            write_json(d / V.BASE_FILE, {"source": source, "fingerprint": fingerprint, "model_kind": model_kind})
            files = [V.BASE_FILE]
            if probes:
                write_json(d / V.PROBES_FILE, normalise_probes(probes))
                files.append(V.PROBES_FILE)
            tags = {V.KIND: "base", V.BASE_FP: fingerprint, V.BASE_SOURCE: source, V.MODEL_KIND: model_kind,
                    V.N_REQUESTS: "0", V.DELTA_KIND: "none"}
            tags.update({V.SHA_PREFIX + f: file_sha256(d / f) for f in files})
            return self._publish(name, None, d, tags, description="base model pointer", run_name=f"{name} v1 (base)",
                                 who=who)

    def base_version(self, line: str) -> Version:
        bases = [v for v in self.versions(line) if v.is_base]
        if not bases:
            raise MissingParentError(f"line {line!r} has no base version; recreate it with ensure_line")
        return bases[0]

    def probes(self, line: str) -> list[dict[str, Any]]:
        """The line's fixed probe set (from its base version), or []."""
        from registry.materialize import fetch_artifact

        base = self.base_version(line)
        if V.PROBES_FILE not in base.artifact_sha256:
            return []
        return json.loads(fetch_artifact(self, base, V.PROBES_FILE).read_text())

    # ------------------------------------------------------------------ versions
    def versions(self, line: str) -> list[Version]:
        """Every version of ``line`` in number order, with its aliases."""
        try:
            rm = self._call(f"get line {line}", self.client.get_registered_model, line)
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                raise LineNotFoundError(f"no model line {line!r} in {self.config.tracking_uri}; "
                                        f"known lines: {', '.join(self.lines()) or 'none'}") from exc
            raise
        by_version: dict[int, list[str]] = {}
        for alias, num in (rm.aliases or {}).items():
            by_version.setdefault(int(num), []).append(alias)
        out, token = [], None
        while True:
            page = self._call(f"list versions of {line}", self.client.search_model_versions,
                              f"name='{line}'", max_results=10000, page_token=token)
            out += [Version.from_mlflow(mv, by_version.get(int(mv.version), [])) for mv in page]
            token = page.token
            if not token:
                break
        return sorted(out, key=lambda v: v.number)

    def version(self, line: str, number: int) -> Version:
        for v in self.versions(line):
            if v.number == int(number):
                return v
        raise VersionNotFoundError(f"line {line!r} has no version {number}")

    def latest(self, line: str) -> Version:
        """The line's head: the highest-numbered version."""
        vs = self.versions(line)
        if not vs:
            raise VersionNotFoundError(f"line {line!r} has no versions; create it with ensure_line")
        return vs[-1]

    def alias_version(self, line: str, alias: str) -> int | None:
        rm = self._call(f"get line {line}", self.client.get_registered_model, line)
        num = (rm.aliases or {}).get(alias)
        return None if num is None else int(num)

    def resolve(self, ref: str | Version | tuple[str, int | str], number: int | str | None = None) -> Version:
        """``models:/line/7``, ``models:/line@champion``, ``models:/line/latest``, ``(line, 7)`` or ``(line, "champion")``."""
        if isinstance(ref, Version):
            return ref
        if isinstance(ref, tuple):
            ref, number = ref
        if number is None:
            m = _URI.match(str(ref))
            if not m:
                raise VersionNotFoundError(
                    f"{ref!r} is not a version reference; write models:/<line>/<number>, models:/<line>@<alias> "
                    "or models:/<line>/latest")
            line, num, alias = m.group("line"), m.group("num"), m.group("alias")
            if num is None and alias is None:
                return self.latest(line)
        else:
            line = str(ref)
            num, alias = (str(number), None) if str(number).isdigit() else (None, str(number))
        if alias is not None:
            got = self.alias_version(line, alias)
            if got is None:
                raise VersionNotFoundError(f"line {line!r} has no alias {alias!r}")
            return self.version(line, got)
        return self.version(line, int(num))

    def chain(self, ref: Any) -> list[Version]:
        """The versions from the base to ``ref`` (inclusive), following parent tags."""
        target = self.resolve(ref)
        by_num = {v.number: v for v in self.versions(target.line)}
        out = [target]
        while not out[-1].is_base:
            parent = out[-1].parent
            if parent is None or parent not in by_num:
                raise MissingParentError(
                    f"version {out[-1].number} of {target.line!r} names parent {parent}, which is missing from the "
                    "registry; the line's history is broken, so it cannot be materialised"
                )
            out.append(by_num[parent])
            if len(out) > len(by_num):
                raise MissingParentError(f"line {target.line!r} has a parent cycle at version {parent}")
        return out[::-1]

    def applied_request_ids(self, line: str, version: int | str | None = None) -> list[str]:
        """Request ids whose change ``version`` (default: head) contains, in the order applied."""
        from registry.materialize import request_ids_of

        chain = self.chain((line, version) if version is not None else self.latest(line))
        ids: list[str] = []
        for v in chain[1:]:
            if v.kind == "revert":
                ids = [i for i in ids if i != v.reverts]
            else:
                ids += request_ids_of(self, v)
        return ids

    # ---------------------------------------------------------------- register
    def register_version(self, line: str, parent: int | Version, delta: LowRankDelta, state: Any = None,
                         gate_report: Any = None, diff: DiffReport | dict | None = None,
                         request_ids: Sequence[str] | None = None, requests: Sequence[Any] | None = None, *,
                         gates_passed: bool | None = None, description: str = "", kind: str = "delta",
                         extra_tags: dict[str, str] | None = None, who: str | None = None,
                         auto_candidate: bool = True) -> Version:
        """Register ``parent + delta`` as the line's next version (compare-and-set on ``parent``).

        Refuses: a missing parent (:class:`MissingParentError`), a parent that is no
        longer the head (:class:`StaleParentError`), a delta for another base
        (:class:`FingerprintMismatchError`), the same delta registered again on the
        same parent (:class:`ImmutableVersionError`). When the gates passed
        (``gates_passed`` or ``gate_report["passed"]``) the ``candidate`` alias moves
        to the new version (recorded like every alias move).
        """
        parent_num = parent.number if isinstance(parent, Version) else int(parent)
        existing = self.versions(line)
        by_num = {v.number: v for v in existing}
        if parent_num not in by_num:
            raise MissingParentError(f"parent version {parent_num} does not exist in line {line!r}")
        base = next((v for v in existing if v.is_base), None)
        if base is None:
            raise MissingParentError(f"line {line!r} has no base version")
        if delta.base_fingerprint and delta.base_fingerprint != base.base_fingerprint:
            raise FingerprintMismatchError(
                f"the delta was computed for base {delta.base_fingerprint[:12]}…, but line {line!r} is built on "
                f"{base.base_fingerprint[:12]}… ({base.base_source}); edit a model materialised from this line")
        if not delta.base_fingerprint:
            from dataclasses import replace

            delta = replace(delta, base_fingerprint=base.base_fingerprint)
        request_ids = list(request_ids if request_ids is not None else delta.request_ids)
        report = _jsonable(gate_report)
        if gates_passed is None and isinstance(report, dict) and "passed" in report:
            gates_passed = bool(report["passed"])

        with tempfile.TemporaryDirectory(prefix="editops-version-") as tmp:
            d = Path(tmp)
            delta_sha = delta.save(d / V.DELTA_FILE)
            for v in existing:
                if v.parent == parent_num and v.tags.get(V.P + "delta_content_sha256") == delta_sha:
                    raise ImmutableVersionError(
                        f"version {v.number} of {line!r} already holds this delta on parent {parent_num}; "
                        "versions are immutable and are not registered twice")
            head = max(by_num)
            if head != parent_num:
                raise StaleParentError(
                    f"line {line!r} moved on: its head is version {head}, not {parent_num}. Materialise version "
                    f"{head}, re-run the edit on it, and register with parent={head}")
            files = [V.DELTA_FILE]
            tags: dict[str, str] = {
                V.KIND: kind, V.PARENT: str(parent_num), V.EDITOR: delta.editor,
                V.HPARAMS: V.hyperparameters_tag(delta.hyperparameters),
                V.DELTA_KIND: delta.kind, V.BASE_FP: base.base_fingerprint, V.BASE_SOURCE: base.base_source,
                V.N_REQUESTS: str(len(request_ids)), V.P + "delta_content_sha256": delta_sha,
                V.P + "delta_bytes": str((d / V.DELTA_FILE).stat().st_size),
            }
            ids_json = json.dumps(request_ids)
            if len(ids_json) <= V.MAX_TAG_VALUE:
                tags[V.REQUEST_IDS] = ids_json
            write_json(d / "request_ids.json", request_ids)
            files.append("request_ids.json")
            if requests:
                (d / "requests.jsonl").write_text(
                    "".join(json.dumps(r if isinstance(r, dict) else r.to_dict(), default=str) + "\n" for r in requests))
                files.append("requests.jsonl")
            if state is not None:
                state.save(d / "state.tmp")
                # content address: tensors + metadata (safetensors' header order is not stable across writes)
                sha = content_sha256({k: v.detach().cpu() for k, v in state.tensors.items()},
                                     {"editor": state.editor, "meta": state.meta})
                tags[V.STATE_SHA] = sha
                holder = next((v for v in existing if v.state_sha256 == sha and v.state_ref is None), None)
                if holder is not None:  # content-addressed: this exact state is stored already
                    tags[V.STATE_REF] = str(holder.number)
                    tags[V.STATE_FILE] = holder.state_file or ""
                    (d / "state.tmp").unlink()
                else:
                    name = f"state-{sha[:12]}.safetensors"
                    (d / "state.tmp").rename(d / name)
                    tags[V.STATE_FILE] = name
                    files.append(name)
            if report is not None:
                write_json(d / "gate_report.json", report)
                files.append("gate_report.json")
            if gates_passed is not None:
                tags[V.GATES_PASSED] = "true" if gates_passed else "false"
            if diff is not None:
                if isinstance(diff, DiffReport):
                    files += [p.name for p in diff.write(d)]
                else:
                    write_json(d / "diff.json", _jsonable(diff))
                    files.append("diff.json")
            tags.update({V.SHA_PREFIX + f: file_sha256(d / f) for f in files})
            tags.update(extra_tags or {})
            manifest = {"line": line, "parent": parent_num, "kind": kind, "artifacts": {f: tags[V.SHA_PREFIX + f] for f in files},
                        "delta_content_sha256": delta_sha, "request_ids": request_ids, "editor": delta.editor,
                        "hyperparameters": delta.hyperparameters, "base_fingerprint": base.base_fingerprint}
            write_json(d / "manifest.json", manifest)
            metrics = {"delta_bytes": float((d / V.DELTA_FILE).stat().st_size), "n_requests": float(len(request_ids)),
                       "delta_norm": sum(x**2 for x in delta.norms().values()) ** 0.5}
            if isinstance(report, dict):
                metrics.update({f"gate.{k}": float(v) for k, v in _flat_numbers(report).items()})
            version = self._publish(line, parent_num, d, tags, description=description,
                                    run_name=f"{line} v{parent_num}+{delta.editor or kind}", metrics=metrics, who=who)
        if gates_passed and auto_candidate:
            from registry.aliases import set_alias

            set_alias(self, line, "candidate", version.number, who=who, why="gates passed at registration",
                      action="register")
            version = self.version(line, version.number)
        return version

    def _publish(self, line: str, parent: int | None, folder: Path, tags: dict[str, str], *, description: str,
                 run_name: str, metrics: dict[str, float] | None = None, who: str | None = None) -> Version:
        """Upload ``folder`` as a run's artifacts, then create the version with all its tags in one call."""
        exp = self._line_experiment(line)
        registration_id = uuid.uuid4().hex
        tags = {**tags, V.REGISTRATION_ID: registration_id}
        run = self._call("create run", self.client.create_run, exp, run_name=run_name,
                         tags={"editops.line": line, "editops.who": current_user(who), V.REGISTRATION_ID: registration_id})
        run_id = run.info.run_id
        try:
            self._call("upload version artifacts", self.client.log_artifacts, run_id, str(folder), V.ARTIFACT_DIR)
            if metrics:
                from mlflow.entities import Metric
                import time

                now = int(time.time() * 1000)
                self._call("log metrics", self.client.log_batch, run_id,
                           metrics=[Metric(re.sub(r"[^\w./ -]", "_", k)[:250], float(v), now, 0)
                                    for k, v in metrics.items()])
            self._call("finish run", self.client.set_terminated, run_id, "FINISHED")

            def create():
                found = self._find_registration(line, registration_id)
                if found is not None:  # an earlier attempt reached the server
                    return found
                return self.client.create_model_version(line, f"runs:/{run_id}/{V.ARTIFACT_DIR}", run_id=run_id,
                                                        tags=tags, description=description, await_creation_for=0)

            mv = self._call(f"register version of {line}", create)
        except Exception:
            try:  # best effort: the run is an orphan, no version exists
                self.client.set_terminated(run_id, "FAILED")
            except Exception:
                pass
            raise
        number = int(mv.version)
        if parent is not None or number != 1:
            earlier = [v.number for v in self.versions(line) if v.number < number]
            expected = parent if parent is not None else None
            if (max(earlier) if earlier else None) != expected:
                self._call("withdraw raced version", self.client.delete_model_version, line, str(number))
                raise StaleParentError(
                    f"another version of {line!r} was registered at the same time on parent {parent}; "
                    f"this registration was withdrawn. Rebase on the new head and register again")
        return self.version(line, number)

    def _find_registration(self, line: str, registration_id: str):
        for mv in self.client.search_model_versions(f"name='{line}'", max_results=10000):
            if (mv.tags or {}).get(V.REGISTRATION_ID) == registration_id:
                return mv
        return None

    # ------------------------------------------------------- load / materialise
    def load(self, ref: Any, number: int | str | None = None, **kwargs: Any):
        """``(model, tokenizer)`` of a version: base + ordered deltas, every artifact sha256-checked."""
        m = self.materialize(ref, number, **kwargs)
        return m.model, m.tokenizer

    def materialize(self, ref: Any, number: int | str | None = None, **kwargs: Any):
        from registry.materialize import materialize

        return materialize(self, self.resolve(ref, number), **kwargs)

    def load_delta(self, version: Version) -> LowRankDelta:
        from registry.materialize import load_delta

        return load_delta(self, version)

    def load_state(self, ref: Any, editor: str | None = None):
        """The editor state saved with a version (None for the base or a version without state)."""
        from registry.materialize import load_state

        return load_state(self, self.resolve(ref), editor)

    def load_requests(self, version: Version) -> list[dict[str, Any]]:
        from registry.materialize import load_requests

        return load_requests(self, version)

    # ------------------------------------------------------------------- others
    def set_alias(self, line: str, alias: str, version: int, *, who: str | None = None, why: str = ""):
        from registry.aliases import set_alias

        return set_alias(self, line, alias, version, who=who, why=why)

    def promote(self, line: str, version: int | None = None, *, who: str | None = None, why: str = "",
                policy: str = "manual"):
        from registry.aliases import promote

        return promote(self, line, version, who=who, why=why, policy=policy)

    def rollback(self, line: str, to: int | None = None, *, who: str | None = None, why: str = ""):
        from registry.aliases import rollback

        return rollback(self, line, to, who=who, why=why)

    def alias_history(self, line: str, alias: str | None = None):
        from registry.aliases import history

        return history(self, line, alias)

    def diff(self, line: str, a: int | None, b: int, probes: Iterable[Any] | None = None, *, behaviour: bool = True,
             log: bool = False) -> DiffReport:
        from registry.materialize import diff_versions

        return diff_versions(self, line, a, b, probes=probes, behaviour=behaviour, log=log)

    def clear_cache(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)


def _flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, dict) and len(out) < 100:
            out.update(_flat_numbers(v, key + "."))
    return dict(list(out.items())[:100])

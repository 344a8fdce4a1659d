"""Materialise a version: base weights + its chain of deltas, every byte checked.

``materialize(reg, version)``:

1. the chain base → … → version is read from the parent tags (one MLflow
   listing call); a missing ancestor is :class:`MissingParentError`;
2. each delta artifact is fetched into a content-addressed blob cache
   (``<cache>/blobs/<sha256>``) and its bytes are hashed and compared with the
   version's ``editops.sha256.delta.safetensors`` tag on *every* load (a missing
   file is :class:`ArtifactMissingError`, a mismatch :class:`IntegrityError`);
   :meth:`LowRankDelta.load` then checks its own content sha256 and that it was
   made for the line's base fingerprint (:class:`FingerprintMismatchError`);
3. the base is loaded (:func:`editing.models.load`, safetensors only) and its
   fingerprint compared with the line's; the fingerprint of a local directory is
   memoised by (path, sizes, mtimes) in ``<cache>/fingerprints.json``;
4. runs of consecutive weight deltas are composed (factors concatenated) and
   added once per weight as one in-place GEMM in the weight's dtype
   (``W ← W + [U₁…Uₙ][V₁…Vₙ]ᵀ``, ``addmm_``); hook deltas are installed in order in
   between;
5. for weight-only chains the edited tensors are cached on disk keyed by
   ``sha256(base fingerprint, ordered delta shas)``, so the next load of the same
   content reads them back (sha-checked) instead of composing again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from editing.atomic import replace_atomically, write_text_atomic
from editing.delta import LowRankDelta, _module_name
from editing.errors import ArtifactMissingError, FingerprintMismatchError, IntegrityError
from registry import versions as V
from registry.store import error_code
from registry.versions import Version, file_sha256

if TYPE_CHECKING:
    from registry.api import Registry


@dataclass
class Materialized:
    """A ready model for a version, with what it was built from and how long each step took."""

    model: Any
    tokenizer: Any
    version: Version
    chain: list[Version]
    loaded: Any  # editing.models.LoadedModel
    timings: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False


# ------------------------------------------------------------------- artifacts
def fetch_artifact(reg: "Registry", version: Version, name: str) -> Path:
    """A verified local copy of one artifact of ``version`` (content-addressed blob cache)."""
    sha = version.artifact_sha256.get(name)
    if not sha:
        raise IntegrityError(f"version {version.number} of {version.line!r} records no sha256 for artifact {name!r}; "
                             "it was not registered by editops or its tags were altered")
    blobs = reg.cache_dir / "blobs"
    blob = blobs / sha
    if blob.is_file():
        if file_sha256(blob) == sha:
            return blob
        blob.unlink()  # a corrupted cache entry: fetch again
    if not version.run_id:
        raise ArtifactMissingError(f"version {version.number} of {version.line!r} has no run holding its artifacts")
    blobs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=blobs, prefix=".dl-") as tmp:
        try:
            local = reg._call(f"download {name} of {version.uri}", reg.client.download_artifacts, version.run_id,
                              f"{V.ARTIFACT_DIR}/{name}", tmp)
        except Exception as exc:
            if isinstance(exc, (OSError,)) or error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") \
                    or "no such file" in str(exc).lower() or "not found" in str(exc).lower() or "404" in str(exc):
                raise ArtifactMissingError(
                    f"artifact {name!r} of {version.uri} is missing from the artifact store ({exc}); "
                    "restore it from a backup of the artifact root — the version cannot be materialised without it"
                ) from exc
            raise
        local = Path(local)
        if not local.is_file():
            raise ArtifactMissingError(f"artifact {name!r} of {version.uri} is missing from the artifact store")
        actual = file_sha256(local)
        if actual != sha:
            raise IntegrityError(
                f"artifact {name!r} of {version.uri} has sha256 {actual[:12]}… but was registered with {sha[:12]}…; "
                "it was modified after registration. Restore the original file; versions are immutable")
        os.replace(local, blob)
    return blob


def request_ids_of(reg: "Registry", version: Version) -> list[str]:
    if version.request_ids is not None:
        return list(version.request_ids)
    return json.loads(fetch_artifact(reg, version, "request_ids.json").read_text())


def load_delta(reg: "Registry", version: Version) -> LowRankDelta:
    path = fetch_artifact(reg, version, V.DELTA_FILE)
    return LowRankDelta.load(path, expect_fingerprint=version.base_fingerprint or None)


def load_requests(reg: "Registry", version: Version) -> list[dict[str, Any]]:
    if "requests.jsonl" not in version.artifact_sha256:
        return []
    text = fetch_artifact(reg, version, "requests.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_state(reg: "Registry", version: Version, editor: str | None = None):
    """The editor state of ``version`` (stored with it or with the earlier version it refers to)."""
    from editing.editors.base import EditorState

    if not version.state_file:
        return None
    holder = version if version.state_ref is None else reg.version(version.line, version.state_ref)
    path = fetch_artifact(reg, holder, version.state_file)  # file bytes checked against the holder's tag
    state = EditorState.load(path, editor)
    if version.state_sha256 and _state_sha(state) != version.state_sha256:
        raise IntegrityError(f"editor state of {version.uri} does not match its recorded content sha256")
    return state


def _state_sha(state) -> str:
    from editing.delta import content_sha256

    return content_sha256(state.tensors, {"editor": state.editor, "meta": state.meta})


# ------------------------------------------------------------------------ base
def _dir_key(path: Path) -> str | None:
    if not path.is_dir():
        return None
    parts = []
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join([str(path.resolve()), *parts]).encode()).hexdigest()


def verified_base(reg: "Registry", base: Version):
    """Load the line's base and check its fingerprint (memoised per unchanged local directory)."""
    from editing.models import fingerprint, load

    source = base.base_source
    loaded = load(source)
    memo_path = reg.cache_dir / "fingerprints.json"
    key = _dir_key(Path(source))
    memo = {}
    if key and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except json.JSONDecodeError:
            memo = {}
    fp = memo.get(key) if key else None
    if fp is None:
        fp = fingerprint(loaded.model)
        if key:
            memo[key] = fp
            # two processes verifying the same base at once: the last writer wins, with the same fingerprint
            write_text_atomic(memo_path, json.dumps(memo))
    if fp != base.base_fingerprint:
        raise FingerprintMismatchError(
            f"the base at {source} has fingerprint {fp[:12]}…, but line {base.line!r} was built on "
            f"{base.base_fingerprint[:12]}…; the base weights changed since the line was created. Restore them "
            "or start a new line")
    loaded._fingerprint = fp
    return loaded


# ------------------------------------------------------------------- applying
@torch.no_grad()
def add_low_rank(model, delta: LowRankDelta) -> None:
    """``W += U Vᵀ`` per weight as one in-place GEMM (``addmm_``) in the weight's dtype: no dense ΔW."""
    from editing.arch import is_transposed
    from editing.errors import DeltaError

    for name, (u, v) in delta.factors.items():
        module = model.get_submodule(_module_name(name))
        w = module.weight
        u, v = u.to(device=w.device, dtype=w.dtype), v.to(device=w.device, dtype=w.dtype)
        if is_transposed(module):  # GPT-2 Conv1D stores (d_in, d_out)
            u, v = v, u
        if tuple(w.shape) != (u.shape[0], v.shape[0]):
            raise DeltaError(f"{name}: delta is {tuple(u.shape[:1] + v.shape[:1])} but the weight is {tuple(w.shape)}")
        w.addmm_(u, v.T)


def apply_chain(model, deltas: Iterable[LowRankDelta]) -> None:
    """Apply deltas in order; consecutive weight deltas are composed (factors stacked) and added once per weight."""
    run: list[LowRankDelta] = []

    def flush():
        if run:
            add_low_rank(model, LowRankDelta.sum(run))
            run.clear()

    for d in deltas:
        if d.kind == "weight":
            run.append(d)
        else:
            flush()
            d.apply(model)
    flush()


def _cache_key(base_fp: str, shas: list[str]) -> str:
    return hashlib.sha256(json.dumps([base_fp, shas]).encode()).hexdigest()


def _edited_params(model, deltas: list[LowRankDelta]) -> dict[str, torch.Tensor]:
    names = sorted({n for d in deltas for n in d.factors})
    return {n: model.get_submodule(_module_name(n)).weight for n in names}


def materialize(reg: "Registry", version: Version, *, use_cache: bool = True, device: str = "cpu") -> Materialized:
    t0 = time.perf_counter()
    chain = reg.chain(version)
    t_chain = time.perf_counter()
    deltas = [load_delta(reg, v) for v in chain[1:]]
    t_deltas = time.perf_counter()
    loaded = verified_base(reg, chain[0])
    t_base = time.perf_counter()
    model = loaded.model
    weight_only = all(d.kind == "weight" for d in deltas)
    shas = [v.artifact_sha256[V.DELTA_FILE] for v in chain[1:]]
    cache_file = reg.cache_dir / "materialized" / f"{_cache_key(chain[0].base_fingerprint, shas)}.safetensors"
    from_cache = False
    if deltas and weight_only and use_cache and cache_file.is_file() and cache_file.with_suffix(".sha256").is_file():
        from safetensors.torch import load_file

        if file_sha256(cache_file) == cache_file.with_suffix(".sha256").read_text().strip():
            params = _edited_params(model, deltas)
            cached = load_file(str(cache_file))
            if set(cached) == set(params):
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(cached[n])
                from_cache = True
    if not from_cache:
        apply_chain(model, deltas)
        if deltas and weight_only and use_cache:
            from safetensors.torch import save_file

            edited = {n: p.detach().contiguous() for n, p in _edited_params(model, deltas).items()}

            def write(tmp: Path) -> None:
                save_file(edited, str(tmp))
                write_text_atomic(cache_file.with_suffix(".sha256"), file_sha256(tmp))

            replace_atomically(cache_file, write)
    model.to(device).eval()
    t_end = time.perf_counter()
    model.editops_version = version.uri  # provenance for callers
    return Materialized(model=model, tokenizer=loaded.tokenizer, version=version, chain=chain, loaded=loaded,
                        from_cache=from_cache,
                        timings={"chain_s": t_chain - t0, "deltas_s": t_deltas - t_chain, "base_s": t_base - t_deltas,
                                 "apply_s": t_end - t_base, "total_s": t_end - t0})


# ------------------------------------------------------------------------ diffs
def split_chains(chain_a: list[Version], chain_b: list[Version]) -> tuple[list[Version], list[Version]]:
    """Versions only on a's chain and only on b's chain (after their last common ancestor)."""
    common = 0
    for x, y in zip(chain_a, chain_b):
        if x.number != y.number:
            break
        common += 1
    return chain_a[common:], chain_b[common:]


def diff_versions(reg: "Registry", line: str, a: int | None, b: int, probes: Iterable[Any] | None = None, *,
                  behaviour: bool = True, log: bool = False):
    """:class:`DiffReport` from version ``a`` (default: b's parent) to ``b``."""
    from registry.diffs import DiffReport, behaviour_diff, net_delta, normalise_probes, read_probes, weight_diff

    vb = reg.version(line, b)
    if a is None:
        a = vb.parent if vb.parent is not None else vb.number
    va = reg.version(line, a)
    only_a, only_b = split_chains(reg.chain(va), reg.chain(vb))
    d_a = [load_delta(reg, v) for v in only_a]
    d_b = [load_delta(reg, v) for v in only_b]
    added = [i for v in only_b for i in (request_ids_of(reg, v) if v.kind != "revert" else [])]
    removed = [i for v in only_a for i in (request_ids_of(reg, v) if v.kind != "revert" else [])]
    removed += [v.reverts for v in only_b if v.kind == "revert" and v.reverts]
    report = DiffReport(line=line, a=va.number, b=vb.number, layers=weight_diff(net_delta(d_b, d_a)),
                        added_requests=added, removed_requests=removed)
    probe_list = normalise_probes(probes) if probes is not None else reg.probes(line)
    if behaviour and probe_list:
        ma = materialize(reg, va)
        if ma.loaded.kind != "causal":
            report.meta["behaviour"] = "behaviour diffs are computed for causal LMs only"
        else:
            ra = read_probes(ma.model, ma.tokenizer, probe_list)
            mb = materialize(reg, vb)
            rb = read_probes(mb.model, mb.tokenizer, probe_list)
            report.probes = behaviour_diff(ra, rb, probe_list)
    if log:
        report.meta["mlflow_run_id"] = log_diff(reg, report)
    return report


def log_diff(reg: "Registry", report) -> str:
    """Log a diff report (JSON, Markdown, HTML, PNG) as an MLflow run of the line; returns the run id."""
    exp = reg._line_experiment(report.line)
    run = reg._call("create diff run", reg.client.create_run, exp, run_name=f"diff v{report.a}→v{report.b}",
                    tags={"editops.line": report.line, "editops.diff": f"{report.a}->{report.b}"})
    with tempfile.TemporaryDirectory() as tmp:
        report.write(tmp)
        reg._call("upload diff", reg.client.log_artifacts, run.info.run_id, tmp, "diff")
    reg._call("finish diff run", reg.client.set_terminated, run.info.run_id, "FINISHED")
    return run.info.run_id

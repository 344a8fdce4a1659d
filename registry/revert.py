"""Revert one request's change from the middle of a line, keeping every later edit.

The line is ``base → … → P → k → k+1 → … → head`` where version ``k`` applied
request ``r`` in a batch ``B_k``. A revert registers a **new version on top of
head** (history is never rewritten) whose delta is

    R = Σ_j Δ'_j  −  Σ_{j ≥ k} Δ_j

so that ``head + R = P + Σ_j Δ'_j``: the line as if ``r`` had never been asked for.

Modes (``mode=``):

- ``"replay"`` (default, exact): materialise ``P`` and its editor state, re-run
  the recorded editor (name + hyperparameters from the tags, or an ``editor``
  you pass) on ``B_k \\ {r}``, then on each later batch ``B_{k+1}, …`` from the
  stored ``requests.jsonl``, carrying the editor state. For a deterministic
  closed-form editor this is the line that never had ``r``, to float rounding
  (measured: tests/registry/test_revert.py, bench/RESULTS.md). The new state is
  stored with the revert version, so editing continues from it correctly.
- ``"subtract"`` (cheap, approximate): ``R = −Δ_k`` when ``B_k`` held only ``r``;
  later deltas stay as they were, although they were solved on top of ``Δ_k``
  (their keys/values saw ``r``'s change). No editor runs. The head's editor state
  is kept (it still counts ``r``'s keys). Refused for a batch with other requests.

The revert version has ``kind="revert"`` and tags ``editops.reverts`` (the request
id), ``editops.revert_of`` (``k``), ``editops.revert_mode``; its ``request_ids.json``
is empty and :meth:`Registry.applied_request_ids` drops ``r`` from then on.
Reverting across an earlier revert version is refused (replay it by hand).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from editing.delta import LowRankDelta
from editing.errors import EditopsError, HyperparameterError, RevertError
from editing.memory import trim_heap
from registry import versions as V

if TYPE_CHECKING:
    from registry.api import Registry
    from registry.versions import Version

MODES = ("replay", "subtract")


def _parse_requests(records: list[dict[str, Any]]):
    from editing.formats import parse_record

    return [parse_record(r, where="requests.jsonl", default_id=str(i)) for i, r in enumerate(records)]


def _default_editor(version: "Version", hyperparameters: dict[str, Any]):
    """The editor ``version`` recorded, rebuilt from its delta's complete ``hyperparameters`` (the version's tag
    may leave long values out). Settings this editops refuses (a key it no longer takes, a combination it
    rejects) are a :class:`RevertError` that says how to go on; other editops errors keep their own message."""
    from editing.editors import get_editor

    try:
        return get_editor(version.editor, **hyperparameters)
    except Exception as exc:
        if isinstance(exc, EditopsError) and not isinstance(exc, HyperparameterError):
            raise
        raise RevertError(
            f"cannot rebuild editor {version.editor!r} of version {version.number} from its recorded "
            f"hyperparameters ({exc}); pass editor=... to revert") from exc


def revert(reg: "Registry", line: str, request_id: str, *, mode: str = "replay",
           editor: Any = None, editor_factory: Callable[["Version"], Any] | None = None,
           who: str | None = None, why: str = "", compact: bool = True) -> "Version":
    """Register a version of ``line`` without ``request_id``'s change (see module doc)."""
    if mode not in MODES:
        raise RevertError(f"unknown revert mode {mode!r}; choose one of {', '.join(MODES)}")
    head = reg.latest(line)
    chain = reg.chain(head)
    from registry.materialize import load_requests, request_ids_of

    idx = next((i for i, v in enumerate(chain) if v.kind == "delta" and request_id in request_ids_of(reg, v)), None)
    if idx is None:
        raise RevertError(f"request {request_id!r} was not applied by any version of {line!r} up to version {head.number}")
    if any(v.kind == "revert" and v.reverts == request_id for v in chain[idx + 1:]):
        raise RevertError(f"request {request_id!r} is already reverted in {line!r}")
    if any(v.kind == "revert" for v in chain[idx + 1:]):
        raise RevertError(f"{line!r} has a revert version after version {chain[idx].number}; reverting across "
                          "another revert is not supported")
    k, parent, later = chain[idx], chain[idx - 1], chain[idx + 1:]
    old = [reg.load_delta(v) for v in [k, *later]]
    hook = [v.number for v, d in zip([k, *later], old) if d.kind != "weight"]
    if hook:
        raise RevertError(f"versions {hook} hold hook deltas; revert works on weight deltas")

    if mode == "subtract":
        ids_k = request_ids_of(reg, k)
        if ids_k != [request_id]:
            raise RevertError(
                f"version {k.number} applied {len(ids_k)} requests together ({', '.join(ids_k[:5])}…); subtracting "
                "its delta would revert them all. Use mode='replay' to re-solve the batch without this request")
        new: list[LowRankDelta] = []
        state = reg.load_state(head)
        replayed: list[int] = []
    else:
        m = reg.materialize(parent)
        model, tok = m.model, m.tokenizer
        state = reg.load_state(parent) if not parent.is_base else None
        new, replayed = [], []
        recorded = {v.number: d.hyperparameters for v, d in zip([k, *later], old)}
        for v in [k, *later]:
            trim_heap()   # as a sequential run: what the previous batch freed goes back to the system
            records = load_requests(reg, v)
            if not records:
                raise RevertError(f"version {v.number} of {line!r} stored no requests (requests.jsonl), so its batch "
                                  "cannot be re-solved; register versions with requests=... to make them revertible")
            reqs = [r for r in _parse_requests(records) if r.request_id != request_id]
            if not reqs:
                continue
            ed = editor or (editor_factory(v) if editor_factory else _default_editor(v, recorded[v.number]))
            result = ed.edit(model, tok, reqs, state)
            result.delta.apply(model)
            new.append(result.delta)
            state = result.state
            replayed.append(v.number)

    # replay: R = Σ new − Σ_{j≥k} old;  subtract: later deltas stay, R = −Δ_k
    parts = [*new, *[d.negate() for d in old]] if mode == "replay" else [old[0].negate()]
    delta = LowRankDelta.sum(parts)
    if compact:
        delta = delta.compact(rtol=1e-9)  # float64 SVD of the stacked factors: exact to rounding
    from dataclasses import replace

    delta = replace(delta, editor=k.editor, hyperparameters=old[0].hyperparameters, request_ids=[],
                    base_fingerprint=k.base_fingerprint,
                    meta={"revert": request_id, "revert_of": k.number, "mode": mode, "replayed": replayed})
    tags = {V.REVERTS: request_id, V.REVERT_OF: str(k.number), V.REVERT_MODE: mode,
            V.P + "replayed": ",".join(map(str, replayed))}
    desc = why or f"revert {request_id} (applied in version {k.number}) by {mode}"
    return reg.register_version(line, head.number, delta, state=state, request_ids=[], kind="revert",
                                extra_tags=tags, description=desc, who=who, auto_candidate=False)

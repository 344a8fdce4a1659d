"""Sequential editing: apply a request list batch after batch with one editor.

For batches ``B_1 … B_n`` (consecutive slices of ``batch_size`` requests, in order):

    result_i = editor.edit(model_{i-1}, tokenizer, B_i, state_{i-1})
    model_i  = model_{i-1} + result_i.delta          (the caller applies the delta)
    state_i  = result_i.state

so batch ``i`` is computed on the model that already carries batches ``1..i-1``,
which is what sequential editing means. The engine behind ``editops edit``, the
fact benchmark and the pipeline. The editor contract (the model comes back from
``edit`` untouched) is checked cheaply when ``check_contract``: from the second
batch on, the weights earlier deltas touched must be unchanged by ``edit``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn

from editing.delta import LowRankDelta
from editing.editors.base import Editor, EditorState, EditResult, RequestDiagnostics
from editing.errors import EditopsError
from editing.memory import trim_heap


@dataclass
class BatchRecord:
    """One applied batch: its number (1-based), requests, result (without its editor state: the run keeps
    only the latest, :attr:`RunResult.state`) and wall time (edit + apply)."""

    index: int
    request_ids: list[str]
    result: EditResult
    seconds: float

    @property
    def n_succeeded(self) -> int:
        return sum(d.succeeded for d in self.result.diagnostics)


@dataclass
class RunResult:
    """Everything a sequential run produced, batch by batch."""

    editor: str
    batch_size: int
    batches: list[BatchRecord] = field(default_factory=list)
    state: EditorState | None = None
    seconds: float = 0.0

    @property
    def deltas(self) -> list[LowRankDelta]:
        return [b.result.delta for b in self.batches]

    @property
    def diagnostics(self) -> list[RequestDiagnostics]:
        return [d for b in self.batches for d in b.result.diagnostics]

    @property
    def failed(self) -> list[RequestDiagnostics]:
        return [d for d in self.diagnostics if not d.succeeded]

    @property
    def n_requests(self) -> int:
        return sum(len(b.request_ids) for b in self.batches)

    @property
    def edit_seconds(self) -> float:
        """Time spent editing and applying (``on_batch`` callbacks, e.g. evaluation, excluded)."""
        return sum(b.seconds for b in self.batches)

    @property
    def seconds_per_edit(self) -> float:
        return self.edit_seconds / self.n_requests if self.n_requests else 0.0

    def total_delta(self) -> LowRankDelta:
        """All batch deltas composed into one (ranks add; ``.compact()`` it to shrink)."""
        return LowRankDelta.sum(self.deltas)

    def summary(self) -> dict:
        """JSON-ready record of the run (per-batch timing and per-request diagnostics)."""
        return {
            "editor": self.editor,
            "batch_size": self.batch_size,
            "n_requests": self.n_requests,
            "n_batches": len(self.batches),
            "n_failed": len(self.failed),
            "seconds": round(self.seconds, 3),
            "edit_seconds": round(self.edit_seconds, 3),
            "seconds_per_edit": round(self.seconds_per_edit, 4),
            "batches": [
                {
                    "batch": b.index,
                    "n_requests": len(b.request_ids),
                    "n_succeeded": b.n_succeeded,
                    "seconds": round(b.seconds, 3),
                    "delta_norms": b.result.delta.norms(),
                    "delta_ranks": {n: b.result.delta.rank(n) for n in b.result.delta.weight_names},
                }
                for b in self.batches
            ],
            "diagnostics": [
                {"request_id": d.request_id, "succeeded": d.succeeded, "value_loss": d.value_loss,
                 "residual_norm": d.residual_norm, "message": d.message, **({"extra": d.extra} if d.extra else {})}
                for d in self.diagnostics
            ],
        }


# An editor that measures its layers and λ (``calibration_requests``, empty: its first batch) is lent the
# run's first requests when a run starts without state: the causal trace reads up to 8, the λ calibration 4
# (editing.editors.memit), so batch size 1 measures on the same requests as batch sizes ≥ 8 instead of on one
# (SmolLM2, 217 edits at batch size 1: λ 1e4 from one request against 3e3 at batch size 100, 2026-12-02).
CALIBRATION_REQUESTS = 8


def batches_of(items: Sequence, batch_size: int) -> list[list]:
    """Consecutive slices of ``batch_size`` items (the last may be shorter)."""
    if batch_size < 1:
        raise EditopsError(f"batch size must be at least 1, got {batch_size}")
    return [list(items[i: i + batch_size]) for i in range(0, len(items), batch_size)]


def _edited_weights_snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names if n in params}


def run_sequential(model: nn.Module, tokenizer, requests: Sequence, editor: Editor, batch_size: int,
                   state: EditorState | None = None, on_batch: Callable[[BatchRecord], None] | None = None,
                   progress: bool = True, base_fingerprint: str | None = None,
                   check_contract: bool = True) -> RunResult:
    """Edit ``model`` in place with ``requests``, ``batch_size`` at a time (see module docstring).

    ``state`` continues an earlier run (else an editor with empty ``calibration_requests`` is lent the
    first :data:`CALIBRATION_REQUESTS` requests for the run); ``on_batch`` is called after each batch is
    applied (evaluate, save, log); ``base_fingerprint`` is stamped on deltas that
    carry none. Returns a :class:`RunResult` whose ``state`` continues the run.
    Raises :class:`EditopsError` when an editor changed the model itself (contract).
    """
    run = RunResult(editor=getattr(editor, "name", type(editor).__name__), batch_size=batch_size, state=state)
    chunks = batches_of(list(requests), batch_size)
    lent = state is None and hasattr(editor, "calibration_requests") and not editor.calibration_requests
    if lent:  # measured on the run's first requests, whatever the batch size (restored below)
        editor.calibration_requests = list(requests)[:CALIBRATION_REQUESTS]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc=f"editing ({run.editor}, batch {batch_size})", unit="edit")
    t_run = time.perf_counter()
    watched: list[str] = []
    try:
        for i, chunk in enumerate(chunks, 1):
            t0 = time.perf_counter()
            before = _edited_weights_snapshot(model, watched) if check_contract else {}
            result = editor.edit(model, tokenizer, chunk, run.state)
            if check_contract:
                params = dict(model.named_parameters())
                changed = [n for n, t in before.items() if not torch.equal(params[n].detach(), t)]
                if changed:
                    raise EditopsError(
                        f"editor {run.editor!r} changed {changed[0]} itself during edit() (batch {i}); editors must "
                        "return the model untouched and put the change in result.delta"
                    )
                watched = sorted(set(watched) | set(result.delta.weight_names))
            if base_fingerprint and not result.delta.base_fingerprint:
                result.delta.base_fingerprint = base_fingerprint
            result.delta.apply(model)
            run.state = result.state
            # the record keeps the batch's delta and diagnostics, not its editor state: only the latest state is
            # needed to continue, and states are large (nse on SmolLM2: 47 MB), so keeping all of them made a
            # 100-batch run's memory grow with every batch (9.8 GB peak at batch size 1, 2026-12-01)
            record = BatchRecord(i, [r.request_id for r in chunk], replace(result, state=None),
                                 time.perf_counter() - t0)
            run.batches.append(record)
            trim_heap()   # freed pages back to the system: without it a long run's resident size climbs
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(failed=len(run.failed))
            if on_batch is not None:
                on_batch(record)
    finally:
        if lent:
            editor.calibration_requests = []
        run.seconds = time.perf_counter() - t_run
        if bar is not None:
            bar.close()
    return run

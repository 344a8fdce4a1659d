"""The sequential runner: batch order, delta application, state threading, callbacks, editor contract."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from editing.delta import LowRankDelta
from editing.editors.base import EditorState, EditResult, RequestDiagnostics
from editing.errors import EditopsError
from editing.requests import FactRequest
from editing.runner import batches_of, run_sequential

W = "transformer.h.0.mlp.c_proj.weight"


@pytest.fixture()
def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2)).eval()


def _reqs(n: int) -> list[FactRequest]:
    return [FactRequest(f"r{i}", "{} is", f"s{i}", f"t{i}") for i in range(n)]


@dataclass
class RankOneProbeEditor:
    """A real (if simple) editor: each batch adds ``len(batch) · e_0 e_0ᵀ`` to ``W`` and counts requests in its state.

    It records the weight entry it saw at each call, so the test can check that
    batch i is computed on the model carrying batches 1..i-1.
    """

    name: str = "probe"
    seen: list[float] = field(default_factory=list)

    @property
    def hyperparameters(self) -> dict:
        return {}

    def edit(self, model, tokenizer, requests, state=None) -> EditResult:
        w = model.get_submodule("transformer.h.0.mlp.c_proj").weight  # Conv1D: (d_in, d_out)
        self.seen.append(float(w[0, 0]))
        d_out, d_in = w.shape[1], w.shape[0]
        u = torch.zeros(d_out, 1)
        u[0, 0] = float(len(requests))
        v = torch.zeros(d_in, 1)
        v[0, 0] = 1.0
        count = (state.tensors["count"] if state else torch.zeros(())) + len(requests)
        return EditResult(LowRankDelta({W: (u, v)}, editor=self.name, request_ids=[r.request_id for r in requests]),
                          EditorState(self.name, {"count": count}),
                          [RequestDiagnostics(r.request_id, succeeded=r.request_id != "r3") for r in requests])


class InPlaceEditor(RankOneProbeEditor):
    """Breaks the contract: changes the weight itself and returns the delta as well."""

    def edit(self, model, tokenizer, requests, state=None) -> EditResult:
        result = super().edit(model, tokenizer, requests, state)
        result.delta.apply(model)
        return result


def test_batches_of():
    assert batches_of(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert batches_of([], 3) == []
    with pytest.raises(EditopsError, match="at least 1"):
        batches_of([1], 0)


def test_batches_are_applied_in_order_with_state(model):
    w0 = float(model.transformer.h[0].mlp.c_proj.weight[0, 0])
    editor = RankOneProbeEditor()
    calls = []
    run = run_sequential(model, None, _reqs(7), editor, 3, on_batch=calls.append, progress=False)
    assert [b.request_ids for b in run.batches] == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
    assert [c.index for c in calls] == [1, 2, 3]
    # batch i saw batches 1..i-1 applied (3, then 3+3)
    assert editor.seen == pytest.approx([w0, w0 + 3, w0 + 6])
    assert float(model.transformer.h[0].mlp.c_proj.weight[0, 0]) == pytest.approx(w0 + 7)
    assert float(run.state.tensors["count"]) == 7
    # only the latest state is kept: a long run's memory does not grow with one state per batch
    assert all(b.result.state is None for b in run.batches)
    assert [d.request_id for d in run.failed] == ["r3"]
    assert run.n_requests == 7 and run.seconds_per_edit > 0
    total = run.total_delta()
    assert total.rank(W) == 3 and total.dense(W)[0, 0] == pytest.approx(7)
    s = run.summary()
    assert s["n_failed"] == 1 and len(s["batches"]) == 3 and len(s["diagnostics"]) == 7


def test_continue_from_state_and_stamp_fingerprint(model):
    first = run_sequential(model, None, _reqs(2), RankOneProbeEditor(), 2, progress=False, base_fingerprint="fp")
    assert first.deltas[0].base_fingerprint == "fp"
    second = run_sequential(model, None, _reqs(3), RankOneProbeEditor(), 2, state=first.state, progress=False)
    assert float(second.state.tensors["count"]) == 5


def test_editor_that_changes_the_model_is_caught(model):
    with pytest.raises(EditopsError, match="changed transformer.h.0.mlp.c_proj.weight itself"):
        run_sequential(model, None, _reqs(4), InPlaceEditor(), 2, progress=False)


@pytest.mark.slow
def test_real_editor_deltas_account_for_every_weight_change(tiny_fact_model, tmp_path):
    """With the sequential editor on a trained model: the model after the run is exactly the base plus the
    sum of the batch deltas (the editor touched nothing itself), and the state continues the run."""
    from editing.editors import get_editor
    from editing.formats import read_requests
    from editing.models import load

    loaded = load(tiny_fact_model.model_dir)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    reqs = read_requests(tiny_fact_model.requests_path, limit=6)
    editor = get_editor("nse", stats_dir=str(tmp_path / "stats"))
    run = run_sequential(loaded.model, loaded.tokenizer, reqs, editor, 3, progress=False,
                         base_fingerprint=loaded.fingerprint)
    assert len(run.batches) == 2 and len(run.diagnostics) == 6
    total = run.total_delta()
    after = dict(loaded.model.named_parameters())
    for name, p in after.items():
        change = (p.detach() - before[name]).double()
        if name in total.factors:
            module = loaded.model.get_submodule(name.rsplit(".", 1)[0])
            expected = total.dense(name).T if type(module).__name__ == "Conv1D" else total.dense(name)
            assert torch.allclose(change, expected, atol=1e-5), name
            assert total.rank(name) <= 6
        else:
            assert torch.equal(change, torch.zeros_like(change)), name
    assert run.state is not None and run.state.editor == "nse"


def test_a_run_at_batch_size_one_measures_lambda_on_its_first_requests(tiny_fact_model, tmp_path):
    """An editor that calibrates λ on its first batch would see one request at batch size 1; the runner
    lends it the run's first requests (CALIBRATION_REQUESTS), for that run only."""
    from editing.editors import get_editor
    from editing.formats import read_requests
    from editing.models import load

    loaded = load(tiny_fact_model.model_dir)
    reqs = read_requests(tiny_fact_model.requests_path, limit=5)
    editor = get_editor("nse", stats_dir=str(tmp_path / "stats"), siblings=0, value={"steps": 10})
    run = run_sequential(loaded.model, loaded.tokenizer, reqs, editor, 1, progress=False)
    first = run.batches[0].result.delta.meta
    assert first["calibration_requests"] == [r.request_id for r in reqs[:4]]
    assert len(first["lambda_trials"]) >= 1 and first["lam"] in [t["lam"] for t in first["lambda_trials"]]
    assert all("calibration_requests" not in b.result.delta.meta for b in run.batches[1:])  # λ from the state
    assert editor.calibration_requests == []  # lent for the run only

"""Every editor on a CUDA device: the edit it makes on the CPU, and diagnostics that say what the GPU model does.

The model sits on the GPU; keys, values and residuals are gathered on the CPU, the closed-form solve runs
in float64 on the model's device, and a delta and a state come back as CPU tensors whatever device the
model is on (they save and compose the same). These tests run where torch sees a GPU (on the device
machine before `bench/bench_large.py` timed the editors); CI has none and skips them.
``EDITOPS_TEST_DEVICE`` names another device (``cpu`` checks the tests themselves on a machine without a GPU).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from editing.editors import get_editor
from editing.models import fingerprint
from editing.requests import DeletionRequest, TranslationProbe
from tinyworld import FILLER, facts, generate_alone, requests, tiny_gpt2, tiny_llama, top1  # noqa: F401  (fixtures)

DEVICE = os.environ.get("EDITOPS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device here (CI has none); run on a GPU machine")

FAST = {"layers": [0], "locus": "subject", "lam": 30.0, "value": {"context_templates": ("{}",), "steps": 15}}


def _corpus(tmp_path) -> str:
    path = tmp_path / "filler.txt"
    path.write_text("\n".join(FILLER) + "\n")
    return f"file:{path}"


def _dense(delta) -> dict[str, torch.Tensor]:
    return {n: delta.dense(n) for n in delta.weight_names}


def _close(a, b, rtol: float) -> None:
    """Dense deltas agree to ``rtol`` of their norm (CUDA kernels sum in another order than the CPU's)."""
    assert sorted(a) == sorted(b)
    for n in a:
        err = float((a[n] - b[n]).norm() / b[n].norm().clamp(min=1e-30))
        assert err < rtol, (n, err)


def _two_batches(model, tok, reqs, editor: str, hp: dict):
    """Two batches in sequence on ``model`` (a copy: it leaves with the first batch's delta applied), and
    whether each ``edit`` left the model bit for bit as it came."""
    ed = get_editor(editor, **hp)
    fp0 = fingerprint(model)
    r1 = ed.edit(model, tok, reqs[:2], None)
    untouched = fingerprint(model) == fp0
    r1.delta.apply(model)
    fp1 = fingerprint(model)
    r2 = ed.edit(model, tok, reqs[2:], r1.state)
    return r1, r2, untouched and fingerprint(model) == fp1


# the same delta on both devices to 2 % (checked on an H200, 2026-12-04): MEMIT, the null-space variant of nse,
# fine-tuning. Plain nse on these tiny models is not in this list: its solve (λ C0 from six filler lines, 64-
# and 128-dim keys) is ill-conditioned enough that float rounding alone moves the delta by 2–12 % (the same
# edit on the CPU with the model in float32 and in float64), so it is checked as the defaults are, below.
@pytest.mark.parametrize("which,editor,extra", [
    ("tiny_llama", "memit", {}),
    ("tiny_llama", "nse", {"nullspace": True, "neuron_share": 0.9, "rewind": True, "siblings": 0, "repasses": 0}),
    ("tiny_gpt2", "ft", {}),
])
def test_closed_form_editors_on_cuda_match_cpu(which, editor, extra, request, facts, tmp_path):
    model, tok = request.getfixturevalue(which)
    reqs = requests(facts, 4)
    hp = ({"layers": [0]} if editor == "ft" else
          {**FAST, "corpus": _corpus(tmp_path), **extra})
    cpu1, cpu2, _ = _two_batches(copy.deepcopy(model), tok, reqs, editor,
                              {**hp, **({} if editor == "ft" else {"stats_dir": str(tmp_path / "cpu")})})
    gpu_model = copy.deepcopy(model).to(DEVICE)
    gpu1, gpu2, untouched = _two_batches(gpu_model, tok, reqs, editor,
                                         {**hp, **({} if editor == "ft" else {"stats_dir": str(tmp_path / "gpu")})})
    assert untouched   # each edit left the model as it came, on the GPU too
    for c, g in ((cpu1, gpu1), (cpu2, gpu2)):
        _close(_dense(g.delta), _dense(c.delta), rtol=2e-2)
        assert [d.succeeded for d in g.diagnostics] == [d.succeeded for d in c.diagnostics]
        assert all(u.device.type == "cpu" and v.device.type == "cpu" for u, v in g.delta.factors.values())
        assert all(t.device.type == "cpu" for t in g.state.tensors.values())
    # the delta goes onto the GPU model and does what the diagnostics say
    gpu2.delta.save(tmp_path / "d.safetensors")
    before = {k: v.clone() for k, v in gpu_model.state_dict().items()}   # the first batch is applied already
    gpu2.delta.apply(gpu_model)
    for r, d in zip(reqs[2:], gpu2.diagnostics):
        assert top1(gpu_model, tok, r.text, r.target_new) == d.succeeded
    gpu2.delta.remove(gpu_model)
    for k, v in gpu_model.state_dict().items():   # removing is exact to float tolerance
        assert torch.allclose(v, before[k], atol=1e-6), k


@pytest.mark.parametrize("which,editor,extra", [
    ("tiny_gpt2", "nse", {}),
    ("tiny_gpt2", "nse", {"repasses": 2, "lam_ladder": 1, "repass_on": "not_taken"}),
    ("tiny_llama", "nse", {"siblings": 0}),
    ("tiny_gpt2", "hook", None),
])
def test_editors_on_cuda_report_what_the_model_does(which, editor, extra, request, facts, tmp_path):
    """nse's defaults (generated sibling lists, a repass where an edit did not take, an ill-conditioned solve
    on these tiny models) and the hook editor's gates (thresholds on z-scores) make choices that can flip on a
    near tie, so the two devices may edit differently: here each batch's diagnostics must say what the GPU
    model with the delta does, and the delta and the state must come back as CPU tensors."""
    model, tok = request.getfixturevalue(which)
    reqs = requests(facts, 4)
    gpu_model = copy.deepcopy(model).to(DEVICE)
    corpus = _corpus(tmp_path)
    hp = ({**FAST, "corpus": corpus, **extra} if extra is not None else
          dict(layers=[0], lam=10.0, context_templates=["{}"], corpus=corpus, reference_corpus=corpus))
    r1, r2, untouched = _two_batches(gpu_model, tok, reqs, editor, {**hp, "stats_dir": str(tmp_path / "gpu")})
    assert untouched
    r2.delta.apply(gpu_model)   # the first is applied already
    for res, batch in ((r1, reqs[:2]), (r2, reqs[2:])):
        assert set(res.delta.request_ids) <= {r.request_id for r in batch} and res.delta.weight_names
        assert all(u.device.type == "cpu" and v.device.type == "cpu" for u, v in res.delta.factors.values())
        assert all(t.device.type == "cpu" for t in res.state.tensors.values())
    for r, d in zip(reqs[2:], r2.diagnostics):
        assert top1(gpu_model, tok, r.text, r.target_new) == d.succeeded
    assert sum(d.succeeded for d in r1.diagnostics + r2.diagnostics) >= 1


def test_deletion_editor_on_cuda_matches_cpu():
    from editing.metrics.deletion import cache_base_outputs, evaluate_deletions
    from editing.training.seq2seq import ModelSize, train_translator

    pairs = [("the cat sees a dog", "cat dog red see"), ("a big house", "house big"),
             ("the small tree", "tree small"), ("the dog likes a cat", "dog cat like")]
    words = sorted({w for s, t in pairs for w in (s + " " + t).split()})
    model, tok, _ = train_translator(pairs, words, arch="bart", size=ModelSize(d_model=32, layers=2, heads=2, d_ff=64),
                                     epochs=200, batch_size=4, lr=5e-3, seed=0)
    req = DeletionRequest("r1", pairs[0][0], "red", "cat dog see",
                          locality=tuple(TranslationProbe(s, t) for s, t in pairs[1:]))
    cpu = get_editor("rank-one", stats_dir=None).edit(model, tok, [req])
    gpu_model = copy.deepcopy(model).to(DEVICE)
    base = cache_base_outputs(gpu_model, tok, [req])
    gpu = get_editor("rank-one", stats_dir=None).edit(gpu_model, tok, [req])
    _close(_dense(gpu.delta), _dense(cpu.delta), rtol=2e-2)
    assert gpu.diagnostics[0].succeeded == cpu.diagnostics[0].succeeded
    gpu.delta.apply(gpu_model)
    rep = evaluate_deletions(gpu_model, tok, [req], base)
    assert rep.instance_gone == 1.0


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_batched_sampling_on_cuda_draws_what_generate_draws_alone(which, request):
    """Sibling lists are sampled in one batch with a generator per row on the model's device: each row equals
    ``generate`` on that device under ``torch.manual_seed(seed)``, as on the CPU (test_sampling.py)."""
    from editing.editors.keys import prompt_ids
    from editing.editors.sampling import sample_topk

    model, tok = request.getfixturevalue(which)
    model = copy.deepcopy(model).to(DEVICE)
    rows = [prompt_ids(tok, p) for p in ("Ada Park lives in", "The job of Bo Chen is", "Cy")]
    seeds = [3, 11, 40]
    batched = sample_topk(model, tok, rows, seeds, 12, top_k=5)
    assert batched == [generate_alone(model, tok, r, s, 12) for r, s in zip(rows, seeds)]

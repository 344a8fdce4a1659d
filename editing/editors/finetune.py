"""Fine-tuning baseline (``ft``): Adam on the same ``W_out`` layers, on the targets' NLL.

For comparison in the benchmark. The weight change of each layer is returned as a
``LowRankDelta`` by truncated SVD to rank ≤ batch size (``ΔW ≈ U Vᵀ``); the relative
Frobenius error of that truncation is recorded in ``delta.meta["svd_rel_error"]``.
The model's weights are copied back afterwards (bit-exact contract).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from editing.arch import get_module, spec_for, uncached, weight_view
from editing.delta import LowRankDelta
from editing.editors.base import EditorState, EditResult, RequestDiagnostics
from editing.editors.keys import pad_id_of, pad_right, prompt_ids, score_targets, target_ids
from editing.models import base_fingerprint


class FineTuneEditor:
    name = "ft"

    def __init__(self, layers: Sequence[int] | None = None, steps: int = 25, lr: float = 5e-3,
                 max_rank: int | None = None, **_: Any) -> None:
        self.layers, self.steps, self.lr, self.max_rank = (tuple(layers) if layers else None), steps, lr, max_rank

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {"layers": list(self.layers) if self.layers else None, "steps": self.steps, "lr": self.lr,
                "max_rank": self.max_rank}

    def edit(self, model: nn.Module, tokenizer, requests: Sequence, state: EditorState | None = None) -> EditResult:
        spec = spec_for(model)
        fp = (state.meta.get("base_fingerprint") if state else None) or base_fingerprint(model)
        layers = list(self.layers or (state.meta.get("layers") if state else None) or [0])
        names = [spec.mlp_out_name(l) for l in layers]
        mods = [get_module(model, n) for n in names]
        saved = [m.weight.detach().clone() for m in mods]
        rows, starts, tg = [], [], []
        for r in requests:
            p, t = prompt_ids(tokenizer, r.text), target_ids(tokenizer, r.target_new)
            rows.append(p + t[:-1]); starts.append(len(p) - 1); tg.append(t)
        ids, mask = pad_right(rows, pad_id_of(tokenizer))
        labels = torch.full_like(ids, -100)
        for i, (s, t) in enumerate(zip(starts, tg)):
            labels[i, s:s + len(t)] = torch.tensor(t)
        device = next(model.parameters()).device
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        was_training = model.training
        losses: list[float] = []
        try:
            for p in params:
                p.requires_grad_(False)
            for m in mods:
                m.weight.requires_grad_(True)
            model.eval()
            opt = torch.optim.Adam([m.weight for m in mods], lr=self.lr)
            for _ in range(self.steps):
                logits = uncached(model, input_ids=ids, attention_mask=mask).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         labels.reshape(-1), ignore_index=-100)
                opt.zero_grad(); loss.backward(); opt.step()
                losses.append(float(loss.detach()))
            factors, errors = {}, {}
            rank = min(len(requests), self.max_rank or len(requests))
            with torch.no_grad():
                for n, m, w0 in zip(names, mods, saved):
                    d = (weight_view(m).double() - (w0.t() if type(m).__name__ == "Conv1D" else w0).double())
                    u, s, vt = torch.linalg.svd(d, full_matrices=False)
                    factors[f"{n}.weight"] = ((u[:, :rank] * s[:rank]).float().cpu(), vt[:rank].T.float().cpu())
                    errors[n] = float(s[rank:].norm() / s.norm().clamp(min=1e-30))
        finally:
            with torch.no_grad():
                for m, w0 in zip(mods, saved):
                    m.weight.copy_(w0)
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.train(was_training)
        delta = LowRankDelta(factors=factors, base_fingerprint=fp, editor=self.name,
                             hyperparameters=self.hyperparameters, request_ids=[r.request_id for r in requests],
                             meta={"svd_rel_error": errors, "layers": layers, "loss": losses[-1:]})
        delta.apply(model)
        try:
            top, _ = score_targets(model, tokenizer, [r.text for r in requests], [r.target_new for r in requests])
        finally:
            with torch.no_grad():
                for m, w0 in zip(mods, saved):
                    m.weight.copy_(w0)
        diags = [RequestDiagnostics(r.request_id, bool(t), value_loss=losses[-1] if losses else None)
                 for r, t in zip(requests, top)]
        st = EditorState(editor=self.name, meta={"base_fingerprint": fp, "layers": layers})
        return EditResult(delta=delta, state=st, diagnostics=diags)

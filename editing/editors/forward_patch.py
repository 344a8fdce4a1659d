"""Forward hooks that patch a module's output for the length of a ``with`` block (the deletion editor's trace,
value optimisation and λ trials run through them, so the model's weights are never changed)."""
from __future__ import annotations

import torch
from torch import nn


class ForwardPatch:
    """Forward hooks that change an MLP output at one position per batch row, or add a low-rank ΔW everywhere."""

    def __init__(self) -> None:
        self.handles: list = []

    def set_at(self, module: nn.Module, pos: int, value: torch.Tensor) -> None:
        def hook(_m, _a, out):
            out = out.clone()
            out[:, pos] = value.to(device=out.device, dtype=out.dtype)
            return out
        self.handles.append(module.register_forward_hook(hook))

    def add_lowrank(self, module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> None:
        """``out += x V Uᵀ`` (``ΔW = U Vᵀ`` applied to the module input ``x``)."""
        w = module.weight
        uf, vf = u.to(device=w.device, dtype=torch.float32), v.to(device=w.device, dtype=torch.float32)

        def hook(_m, args, out):
            return out + ((args[0].to(vf.dtype) @ vf) @ uf.T).to(out.dtype)
        self.handles.append(module.register_forward_hook(hook))

    def capture_input(self, module: nn.Module, store: dict, key: str) -> None:
        def hook(_m, args):
            store[key] = args[0].detach()
        self.handles.append(module.register_forward_pre_hook(hook))

    def capture_output(self, module: nn.Module, store: dict, key: str) -> None:
        def hook(_m, _a, out):
            store[key] = out.detach()
        self.handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> "ForwardPatch":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

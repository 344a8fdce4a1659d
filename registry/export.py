"""Export a version for use without editops.

- :func:`export_merged`: a plain Hugging Face directory (``config.json``,
  ``model.safetensors``, tokenizer files) of the materialised version, loadable
  with ``AutoModelForCausalLM.from_pretrained(dir)``; ``editops_version.json``
  records line, version, base fingerprint and request ids.
- :func:`export_peft`: a PEFT LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) for the base model. The chain's weight deltas
  are summed per weight and re-factored to their numerical rank
  (:meth:`LowRankDelta.compact`, exact up to float64 rounding); for each
  weight ``lora_B = U`` (d_out × r) and ``lora_A = Vᵀ`` (r × d_in) with
  ``lora_alpha = r`` so PEFT's scaling ``alpha / r`` is 1 and
  ``W + B A = W + U Vᵀ``. Ranks differ per weight (``rank_pattern`` /
  ``alpha_pattern``); GPT-2's ``Conv1D`` is handled by PEFT
  (``fan_in_fan_out``). The adapter is built through ``peft`` itself
  (``get_peft_model`` + ``save_pretrained``), not by writing its format by hand.

Hook deltas are not weight changes, so neither export applies to them
(:class:`ExportError`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from editing.delta import LowRankDelta, _module_name
from editing.errors import ExportError

if TYPE_CHECKING:
    from registry.api import Registry


def _provenance(reg: "Registry", chain, fmt: str) -> dict[str, Any]:
    v = chain[-1]
    return {"line": v.line, "version": v.number, "uri": v.uri, "format": fmt, "base_source": chain[0].base_source,
            "base_fingerprint": chain[0].base_fingerprint, "request_ids": reg.applied_request_ids(v.line, v.number),
            "chain": [c.number for c in chain], "tracking_uri": _redact(reg.config.tracking_uri)}


def _redact(uri: str) -> str:
    """Drop any ``user:password@`` from a URI before it is written anywhere."""
    return re.sub(r"//[^/@]+@", "//", uri)


def _check_weight_only(chain) -> None:
    hooks = [v.number for v in chain[1:] if v.delta_kind == "hook"]
    if hooks:
        raise ExportError(
            f"versions {hooks} carry hook deltas (gated modules, not weight changes); a merged HF directory or a "
            "LoRA adapter cannot express them. Export a version of a weight-editing line instead")


def export_merged(reg: "Registry", ref: Any, out_dir: str | Path) -> Path:
    """Write the materialised version as a plain HF model directory (safetensors)."""
    v = reg.resolve(ref)
    chain = reg.chain(v)
    _check_weight_only(chain)
    m = reg.materialize(v)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(m.model, "editops_version"):
        del m.model.editops_version
    m.model.save_pretrained(out, safe_serialization=True)
    m.tokenizer.save_pretrained(out)
    (out / "editops_version.json").write_text(json.dumps(_provenance(reg, chain, "merged"), indent=2))
    return out


def net_chain_delta(reg: "Registry", chain, rtol: float = 1e-9) -> LowRankDelta | None:
    """Σ of the chain's weight deltas, compacted to its numerical rank (revert versions included)."""
    deltas = [reg.load_delta(v) for v in chain[1:]]
    deltas = [d for d in deltas if d.factors]
    if not deltas:
        return None
    return LowRankDelta.sum(deltas).compact(rtol=rtol)


def export_peft(reg: "Registry", ref: Any, out_dir: str | Path, *, rank: int | None = None) -> Path:
    """Write a PEFT LoRA adapter whose effect on the base equals the version's net delta.

    ``rank`` caps each weight's LoRA rank (truncated SVD: then the adapter is an
    approximation; the default keeps the exact numerical rank).
    """
    from peft import LoraConfig, get_peft_model

    v = reg.resolve(ref)
    chain = reg.chain(v)
    _check_weight_only(chain)
    net = net_chain_delta(reg, chain)
    if net is None:
        raise ExportError(f"{v.uri} is the base model: there is no change to export as an adapter")
    if rank is not None:
        net = net.compact(rank=rank)
    from registry.materialize import verified_base

    base = verified_base(reg, chain[0])
    modules = {_module_name(n): n for n in net.weight_names}
    ranks = {m: net.rank(n) for m, n in modules.items()}
    r0 = max(ranks.values())
    cfg = LoraConfig(r=r0, lora_alpha=r0, lora_dropout=0.0, bias="none", target_modules=sorted(modules),
                     rank_pattern={m: r for m, r in ranks.items()}, alpha_pattern={m: r for m, r in ranks.items()},
                     fan_in_fan_out=base.spec.transposed, init_lora_weights=False,
                     task_type="SEQ_2_SEQ_LM" if base.kind == "seq2seq" else "CAUSAL_LM")
    peft_model = get_peft_model(base.model, cfg)
    with torch.no_grad():
        for module_name, weight_name in modules.items():
            layer = peft_model.base_model.model.get_submodule(module_name)
            u, vv = net.factors[weight_name]
            a = layer.lora_A["default"].weight
            b = layer.lora_B["default"].weight
            if tuple(a.shape) != (vv.shape[1], vv.shape[0]) or tuple(b.shape) != tuple(u.shape):
                raise ExportError(f"{module_name}: LoRA shapes {tuple(b.shape)}·{tuple(a.shape)} do not fit the delta "
                                  f"{tuple(u.shape)}·{tuple(vv.T.shape)}")
            if abs(layer.scaling["default"] - 1.0) > 1e-12:
                raise ExportError(f"{module_name}: PEFT scaling is {layer.scaling['default']}, expected 1")
            a.copy_(vv.T.to(a.dtype))
            b.copy_(u.to(b.dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].base_model_name_or_path = chain[0].base_source
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / "editops_version.json").write_text(json.dumps(
        {**_provenance(reg, chain, "peft-lora"), "ranks": ranks, "rank_cap": rank}, indent=2))
    return out

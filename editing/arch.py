"""Where each architecture keeps the matrix editops edits.

The edited matrix of layer ``l`` is the MLP output projection ``W_out``: its input
is the MLP's hidden activation (the *key* space, size ``d_ff``) and its output is
added to the residual stream (size ``d_model``). Editors always reason about
``W_out`` as a ``(d_out, d_in) = (d_model, d_ff)`` matrix; GPT-2's ``Conv1D``
stores the transpose, which :func:`weight_view` / :func:`add_to_weight` hide.

One mapping (``ADAPTERS``) from ``config.model_type`` to module-name templates, as
peft keeps its target-module table; every entry is checked against a tiny model
of its family (``tests/editing/test_arch.py``). A causal LM whose type is not
listed gets its adapter by :func:`discover_spec`, from the module tree: the
layer list, and in each layer the one dense projection from another width
(d_in ≠ d_model) onto the residual stream outside attention (a warning names the
template it chose). Where that is not one module (mixture-of-experts layers, no
layer list) or the model is an encoder-decoder, the
model is rejected with :class:`UnsupportedArchitectureError`, naming the
override (``mlp_out_template``) a user can give.
"""
from __future__ import annotations

import functools
import inspect
import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from editing.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class StackSpec:
    """One stack of layers (a causal LM has one; an encoder-decoder has two).

    ``mlp_out`` is a module-name template with ``{}`` for the layer index;
    ``layer`` is the template of the whole block (its output is the residual stream).
    """

    name: str
    mlp_out: str
    layer: str
    n_layers_attr: str


@dataclass(frozen=True)
class ArchSpec:
    """How editops finds the edited matrices of one architecture."""

    model_type: str
    stacks: tuple[StackSpec, ...]
    transposed: bool = False  # True where W_out is a Conv1D (weight stored as d_in x d_out)
    source: str = "table"     # "table" (ADAPTERS), "template" (the user's mlp_out_template), "discovered"

    def stack(self, name: str | None = None) -> StackSpec:
        """The stack called ``name`` (default: the last one, the decoder of a seq2seq model)."""
        if name is None:
            return self.stacks[-1]
        for s in self.stacks:
            if s.name == name:
                return s
        raise UnsupportedArchitectureError(
            f"{self.model_type} has no stack {name!r}; it has {[s.name for s in self.stacks]}"
        )

    def mlp_out_name(self, layer: int, stack: str | None = None) -> str:
        return self.stack(stack).mlp_out.format(layer)

    def layer_name(self, layer: int, stack: str | None = None) -> str:
        return self.stack(stack).layer.format(layer)

    def num_layers(self, config, stack: str | None = None) -> int:
        attr = self.stack(stack).n_layers_attr
        cfg = getattr(config, "text_config", None) or config
        value = getattr(cfg, attr, None)
        if value is None:
            value = getattr(config, attr)
        return int(value)


def _causal(model_type: str, mlp_out: str, layer: str, n_layers: str, transposed: bool = False) -> ArchSpec:
    return ArchSpec(model_type, (StackSpec("decoder", mlp_out, layer, n_layers),), transposed)


def _seq2seq(model_type: str, enc: tuple[str, str, str], dec: tuple[str, str, str]) -> ArchSpec:
    return ArchSpec(model_type, (StackSpec("encoder", *enc), StackSpec("decoder", *dec)))


_LLAMA_LIKE = ("model.layers.{}.mlp.down_proj", "model.layers.{}", "num_hidden_layers")
_BART_LIKE_ENC = ("model.encoder.layers.{}.fc2", "model.encoder.layers.{}", "encoder_layers")
_BART_LIKE_DEC = ("model.decoder.layers.{}.fc2", "model.decoder.layers.{}", "decoder_layers")

ADAPTERS: dict[str, ArchSpec] = {
    "gpt2": _causal("gpt2", "transformer.h.{}.mlp.c_proj", "transformer.h.{}", "n_layer", transposed=True),
    "gptj": _causal("gptj", "transformer.h.{}.mlp.fc_out", "transformer.h.{}", "n_layer"),
    "gpt_neox": _causal("gpt_neox", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}", "num_hidden_layers"),
    "opt": _causal("opt", "model.decoder.layers.{}.fc2", "model.decoder.layers.{}", "num_hidden_layers"),
    **{t: _causal(t, *_LLAMA_LIKE) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                                              "olmo", "olmo2", "olmo3", "smollm3", "stablelm", "granite", "cohere",
                                              "helium", "exaone4", "nemotron")},
    "bloom": _causal("bloom", "transformer.h.{}.mlp.dense_4h_to_h", "transformer.h.{}", "n_layer"),
    "falcon": _causal("falcon", "transformer.h.{}.mlp.dense_4h_to_h", "transformer.h.{}", "num_hidden_layers"),
    "gpt_neo": _causal("gpt_neo", "transformer.h.{}.mlp.c_proj", "transformer.h.{}", "num_layers"),
    "gpt_bigcode": _causal("gpt_bigcode", "transformer.h.{}.mlp.c_proj", "transformer.h.{}", "n_layer"),
    "codegen": _causal("codegen", "transformer.h.{}.mlp.fc_out", "transformer.h.{}", "n_layer"),
    "mpt": _causal("mpt", "transformer.blocks.{}.ffn.down_proj", "transformer.blocks.{}", "n_layers"),
    "phi": _causal("phi", "model.layers.{}.mlp.fc2", "model.layers.{}", "num_hidden_layers"),
    "starcoder2": _causal("starcoder2", "model.layers.{}.mlp.c_proj", "model.layers.{}", "num_hidden_layers"),
    "xglm": _causal("xglm", "model.layers.{}.fc2", "model.layers.{}", "num_layers"),
    # state-space models: the mixer's output projection is the layer's one matrix onto the residual stream
    **{t: _causal(t, "backbone.layers.{}.mixer.out_proj", "backbone.layers.{}", "num_hidden_layers")
       for t in ("mamba", "mamba2", "falcon_mamba")},
    # RWKV's channel mix writes receptance ⊙ (W_value k): the update is written through that gate (measured: a
    # tiny RWKV's edits take, tests/editing/test_editors.py)
    "rwkv": _causal("rwkv", "rwkv.blocks.{}.feed_forward.value", "rwkv.blocks.{}", "num_hidden_layers"),
    "gemma3": _causal("gemma3", "model.language_model.layers.{}.mlp.down_proj", "model.language_model.layers.{}", "num_hidden_layers"),
    **{t: _seq2seq(t, ("encoder.block.{}.layer.1.DenseReluDense.wo", "encoder.block.{}", "num_layers"),
                   ("decoder.block.{}.layer.2.DenseReluDense.wo", "decoder.block.{}", "num_decoder_layers"))
       for t in ("t5", "mt5")},
    # m2m_100 is NLLB's and M2M100's type
    **{t: _seq2seq(t, _BART_LIKE_ENC, _BART_LIKE_DEC) for t in ("marian", "bart", "mbart", "m2m_100", "pegasus")},
}


def custom_spec(model_type: str, mlp_out_template: str, layer_template: str | None = None,
                n_layers_attr: str = "num_hidden_layers") -> ArchSpec:
    """An adapter from a user's module-name template, e.g. ``model.layers.{}.mlp.down_proj``."""
    if "{}" not in mlp_out_template:
        raise UnsupportedArchitectureError(
            f"module-name template {mlp_out_template!r} needs '{{}}' where the layer index goes"
        )
    layer = layer_template or mlp_out_template.rsplit(".{}.", 1)[0] + ".{}"
    return _causal(model_type, mlp_out_template, layer, n_layers_attr)


# model types whose layers carry a recurrent state (no attention over earlier positions): a left-padded row's pad
# tokens enter that state, so batched sampling takes their rows one length at a time (editing.editors.sampling)
RECURRENT_TYPES = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv"})


def is_recurrent(model: nn.Module) -> bool:
    """Whether ``model``'s type is one of :data:`RECURRENT_TYPES`."""
    return getattr(model.config, "model_type", None) in RECURRENT_TYPES

_OVERRIDE_HINT = ("Name the MLP output projection yourself with the module-name template, e.g. "
                  "--mlp-out-template 'model.layers.{}.mlp.down_proj' (Python: spec_for(model, mlp_out_template=...)).")
_N_LAYERS_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_ATTENTION_WORDS = ("attn", "attention")
_EXPERT_WORDS = ("expert", "moe")

log = logging.getLogger(__name__)


class DiscoveredAdapterWarning(UserWarning):
    """editops had no adapter for a model type and found its MLP output projection from the module tree."""


def _residual_width(model: nn.Module) -> int | None:
    cfg = getattr(model.config, "text_config", None) or model.config
    width = getattr(cfg, "hidden_size", None)
    if width is None and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        width = getattr(emb, "embedding_dim", None)
    return int(width) if width else None


def _projections(block: nn.Module) -> list[tuple[str, int, int]]:
    """``(name, d_in, d_out)`` of every module in ``block`` holding a 2-D ``weight`` (Linear, Conv1D, subclasses)."""
    out = []
    for name, module in block.named_modules():
        w = getattr(module, "weight", None)
        if name and isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(module, nn.Embedding):
            d_in, d_out = in_out_features(module)
            out.append((name, d_in, d_out))
    return out


def _layer_span(list_name: str, idx: list[int], n: int) -> str:
    """``model.layers.{1..2} (of 3 layers)``, or ``model.layers.0`` where one layer is named."""
    if len(idx) == 1:
        return f"{list_name}.{idx[0]}"
    span = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx))
    return f"{list_name}.{{{span}}} (of {n} layers)"


def discover_spec(model: nn.Module) -> ArchSpec:
    """The adapter of a causal LM no table entry knows, read from its module tree (encoder-decoder models are
    refused: their two layer lists cannot be told apart by shape).

    The layer list is the ``nn.ModuleList`` whose length is the config's layer count
    (``num_hidden_layers``, ``n_layer``, ``num_layers`` or ``n_layers``). In its first layer
    the edited matrix is the one module with a 2-D weight that maps a space wider or narrower
    than the residual stream (``d_in ≠ d_model``) onto it (``d_out = d_model``) and lies outside
    attention (no ``attn``/``attention`` in its path): MEMIT's ``W_out``. Raises
    :class:`UnsupportedArchitectureError` where that is not exactly one module in every layer,
    or where any layer holds experts (a mixture-of-experts MLP has no single ``W_out``; every layer is read, as
    DeepSeek-style models keep their first layers dense).
    """
    config = model.config
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"editops has no adapter for the encoder-decoder model_type {model_type!r} (known: "
            f"{', '.join(sorted(ADAPTERS))}); discovery reads causal LMs only (an encoder-decoder has two layer "
            "lists to tell apart). Add an entry to editing.arch.ADAPTERS like 'bart' or 't5'.")
    cfg = getattr(config, "text_config", None) or config
    counts = {a: int(v) for a in _N_LAYERS_ATTRS for v in [getattr(cfg, a, None)] if isinstance(v, int) and v > 0}
    width = _residual_width(model)
    if not counts or width is None:
        raise UnsupportedArchitectureError(
            f"editops has no adapter for model_type {model_type!r} (known: {', '.join(sorted(ADAPTERS))}) and cannot "
            f"read its layer count or residual width from the config to find one. " + _OVERRIDE_HINT)
    # a list of experts whose length happens to equal the layer count is not a layer list
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) in counts.values() and name
             and not any(w in name.lower() for w in _EXPERT_WORDS)]
    found: list[tuple[str, str, str]] = []   # (list name, projection path in the layer, config attr)
    notes: list[str] = []
    for list_name, layers in lists:
        moe = {i: sorted({n for n, _ in b.named_modules() if any(w in n.lower() for w in _EXPERT_WORDS)})
               for i, b in enumerate(layers)}
        moe = {i: names for i, names in moe.items() if names}
        if moe:   # every layer is read: DeepSeek-style models keep their first layers dense
            first = moe[min(moe)]
            notes.append(f"{_layer_span(list_name, sorted(moe), len(layers))} hold{'s' if len(moe) == 1 else ''} "
                         f"experts ({', '.join(first[:3])}): a mixture-of-experts MLP has no single output "
                         "projection to edit")
            continue
        block = layers[0]
        cands = [n for n, d_in, d_out in _projections(block)
                 if d_out == width and d_in != width and not any(w in n.lower() for w in _ATTENTION_WORDS)]
        if len(cands) == 1:
            attr = next(a for a, v in counts.items() if v == len(layers))
            missing = [i for i, b in enumerate(layers) if cands[0] not in dict(b.named_modules())]
            if missing:
                notes.append(f"{list_name}.0.{cands[0]} is not in {_layer_span(list_name, missing, len(layers))}")
            else:
                found.append((list_name, cands[0], attr))
        elif cands:
            notes.append(f"{list_name}.0 has {len(cands)} candidates ({', '.join(cands)})")
    if len(found) != 1:
        why = "; ".join(notes) or "no layer list with one projection onto the residual stream outside attention"
        if len(found) > 1:
            why = "several layer lists qualify: " + ", ".join(f"{a}.{{}}.{b}" for a, b, _ in found)
        raise UnsupportedArchitectureError(
            f"editops has no adapter for model_type {model_type!r} (known: {', '.join(sorted(ADAPTERS))}) and "
            f"could not find its MLP output projection: {why}. " + _OVERRIDE_HINT)
    list_name, proj, attr = found[0]
    spec = ArchSpec(model_type, (StackSpec("decoder", f"{list_name}.{{}}.{proj}", f"{list_name}.{{}}", attr),),
                    transposed=is_transposed(get_module(model, f"{list_name}.0.{proj}")), source="discovered")
    return spec


_WARNED: set[tuple[str, str]] = set()


def spec_for(model: nn.Module, mlp_out_template: str | None = None) -> ArchSpec:
    """The adapter of ``model``: the user's ``mlp_out_template`` if given, else the table's entry for
    ``config.model_type``, else :func:`discover_spec` (with a :class:`DiscoveredAdapterWarning` naming
    the template it found, once per model type and template)."""
    config = model.config
    model_type = getattr(config, "model_type", None) or type(model).__name__
    # a template given at load time (editing.models.load) travels with the model to every editor
    mlp_out_template = mlp_out_template or getattr(model, "editops_mlp_out_template", None)
    if mlp_out_template:
        spec = replace(custom_spec(model_type, mlp_out_template), source="template")
    elif model_type in ADAPTERS:
        spec = ADAPTERS[model_type]
    else:
        spec = discover_spec(model)
        key = (model_type, spec.stacks[-1].mlp_out)
        if key not in _WARNED:
            _WARNED.add(key)
            msg = (f"editops has no adapter for model_type {model_type!r}; it edits {spec.stacks[-1].mlp_out!r}, "
                   "found from the module tree (the one projection onto the residual stream outside attention "
                   "in each layer). If that is not the MLP's output projection, pass --mlp-out-template.")
            warnings.warn(msg, DiscoveredAdapterWarning, stacklevel=2)
            log.warning(msg)
    names = dict(model.named_modules())
    first = spec.mlp_out_name(0)
    if first not in names:
        raise UnsupportedArchitectureError(
            f"{model_type}: module {first!r} not found in {type(model).__name__}; pass a module-name "
            "template that matches the model (see `model.named_modules()`) as --mlp-out-template"
        )
    _refuse_rescaled_weights(model, spec)
    return spec


def _refuse_rescaled_weights(model: nn.Module, spec: ArchSpec) -> None:
    """RWKV divides block ``i``'s ``feed_forward.value`` weight in place by ``2 ** (i // rescale_every)`` on its
    first forward in eval mode (and multiplies it back in train mode): a delta solved against one scale would be
    applied at another, and the weights' fingerprint would change with the mode. Refused where that touches a
    layer (``rescale_every > 0`` and more layers than it); ``rescale_every = 0`` turns it off."""
    every = getattr(model.config, "rescale_every", 0) or 0
    n = spec.num_layers(model.config)
    if getattr(model.config, "model_type", None) == "rwkv" and every > 0 and n > every:
        raise UnsupportedArchitectureError(
            f"this RWKV model rescales its layers' output weights in place every {every} layers (config "
            f"rescale_every={every}, {n} layers), so a weight delta would be solved and applied at different scales. "
            "Load it with rescale_every=0 (AutoModelForCausalLM.from_pretrained(..., rescale_every=0); the rescale "
            "only guards float16 against overflow) and edit that.")


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(f"module {name!r} not found in {type(model).__name__}") from exc


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D, whose weight is stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D"


def weight_view(module: nn.Module) -> torch.Tensor:
    """The module's weight as a ``(d_out, d_in)`` matrix (a view, no copy)."""
    w = module.weight
    return w.t() if is_transposed(module) else w


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a Linear or Conv1D."""
    d_out, d_in = weight_view(module).shape
    return d_in, d_out


@torch.no_grad()
def add_to_weight(module: nn.Module, delta_out_in: torch.Tensor) -> None:
    """``W += delta`` where ``delta`` is given as ``(d_out, d_in)``."""
    w = module.weight
    d = delta_out_in.t() if is_transposed(module) else delta_out_in
    w.add_(d.to(device=w.device, dtype=w.dtype))


def uncached(model: nn.Module, **inputs: Any) -> Any:
    """``model(**inputs)`` with ``use_cache=False`` where ``model.forward`` takes it (or ``**kwargs``): the editors'
    forwards read no key/value cache, and a cached recurrent state (RWKV's) is written in place, which breaks a
    backward pass through it."""
    return model(**inputs, **({"use_cache": False} if _takes_use_cache(type(model)) else {}))


@functools.lru_cache(maxsize=None)
def _takes_use_cache(model_class: type) -> bool:
    """Read once per model class: :func:`uncached` runs every forward of the editors' inner loops."""
    params = inspect.signature(model_class.forward).parameters
    return "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

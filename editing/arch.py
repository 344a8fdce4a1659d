"""Where each architecture keeps the matrix editops edits.

The edited matrix of layer ``l`` is the MLP output projection ``W_out``: its input
is the MLP's hidden activation (the *key* space, size ``d_ff``) and its output is
added to the residual stream (size ``d_model``). Editors always reason about
``W_out`` as a ``(d_out, d_in) = (d_model, d_ff)`` matrix; GPT-2's ``Conv1D``
stores the transpose, which :func:`weight_view` / :func:`add_to_weight` hide.

One mapping (``ADAPTERS``) from ``config.model_type`` to module-name templates, as
peft keeps its target-module table. A model whose type is not listed is
rejected with :class:`UnsupportedArchitectureError`, naming the override
(``mlp_out_template``) a user can give.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    **{t: _causal(t, *_LLAMA_LIKE) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "smollm3")},
    "gemma3": _causal("gemma3", "model.language_model.layers.{}.mlp.down_proj", "model.language_model.layers.{}", "num_hidden_layers"),
    "t5": _seq2seq(
        "t5",
        ("encoder.block.{}.layer.1.DenseReluDense.wo", "encoder.block.{}", "num_layers"),
        ("decoder.block.{}.layer.2.DenseReluDense.wo", "decoder.block.{}", "num_decoder_layers"),
    ),
    "marian": _seq2seq("marian", _BART_LIKE_ENC, _BART_LIKE_DEC),
    "bart": _seq2seq("bart", _BART_LIKE_ENC, _BART_LIKE_DEC),
    "mbart": _seq2seq("mbart", _BART_LIKE_ENC, _BART_LIKE_DEC),
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


def spec_for(model: nn.Module, mlp_out_template: str | None = None) -> ArchSpec:
    """The adapter of ``model``; ``mlp_out_template`` overrides the table for unknown models."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    # a template given at load time (editing.models.load) travels with the model to every editor
    mlp_out_template = mlp_out_template or getattr(model, "editops_mlp_out_template", None)
    if mlp_out_template:
        spec = custom_spec(model_type, mlp_out_template)
    elif model_type in ADAPTERS:
        spec = ADAPTERS[model_type]
    else:
        raise UnsupportedArchitectureError(
            f"editops has no adapter for model_type {model_type!r} (known: {', '.join(sorted(ADAPTERS))}). "
            "Name the MLP output projection yourself with the module-name template, e.g. "
            "--mlp-out-template 'model.layers.{}.mlp.down_proj' (Python: spec_for(model, mlp_out_template=...))."
        )
    names = dict(model.named_modules())
    first = spec.mlp_out_name(0)
    if first not in names:
        raise UnsupportedArchitectureError(
            f"{model_type}: module {first!r} not found in {type(model).__name__}; pass a module-name "
            "template that matches the model (see `model.named_modules()`) as --mlp-out-template"
        )
    return spec


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

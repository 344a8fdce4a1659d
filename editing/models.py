"""Loading any Hugging Face causal LM or seq2seq model, and fingerprinting its weights.

``load(name_or_path)`` accepts a local directory (safetensors), a hub id (works
where the hub is reachable or cached; offline it fails with a clear
:class:`ModelLoadError`), or a directory holding a ``.gguf`` file. Weights are
never read from pickles: ``use_safetensors=True`` is always passed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from editing.arch import ArchSpec, spec_for
from editing.errors import GGUFError, ModelLoadError

ModelKind = Literal["causal", "seq2seq"]


@dataclass
class LoadedModel:
    """A model with its tokenizer, adapter and where it came from."""

    model: nn.Module
    tokenizer: object
    spec: ArchSpec
    source: str
    kind: ModelKind

    @property
    def fingerprint(self) -> str:
        """The weights' fingerprint when editops first saw this model object (:func:`base_fingerprint`)."""
        return base_fingerprint(self.model)


def model_kind(config) -> ModelKind:
    """``seq2seq`` for encoder-decoder configs, else ``causal``."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _auto_class(kind: ModelKind):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_hub_id(name: str) -> bool:
    """``org/name`` or ``name``: what the Hugging Face hub accepts as a repository id."""
    return bool(_HUB_ID.match(name)) and not name.endswith((".gguf", ".safetensors", ".json"))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or ``None``): the first CUDA device when torch sees one, else the CPU; any other name as
    torch reads it (``cpu``, ``cuda``, ``cuda:1``, ``mps``). Raises :class:`ModelLoadError` for a name torch
    does not know or a CUDA device that is not there."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"device {device!r}: {exc}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here; "
                             "use --device cpu (or auto)")
    return dev


def load(name_or_path: str | os.PathLike, kind: ModelKind | None = None, *, gguf_file: str | None = None,
         mlp_out_template: str | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model and tokenizer from a local directory or a hub id, onto ``device`` (:func:`resolve_device`).

    Raises :class:`ModelLoadError` for a path that does not exist, a hub id that
    cannot be reached, or files transformers cannot read; :class:`GGUFError` for a
    bad GGUF file; :class:`UnsupportedArchitectureError` for an unknown layout.
    """
    from transformers import AutoConfig, AutoTokenizer

    target = resolve_device(device)
    source = str(name_or_path)
    path = Path(source).expanduser()
    if path.exists():
        source = str(path.resolve())
    elif not _is_hub_id(source):
        raise ModelLoadError(f"model path {source!r} does not exist; give a model directory or a hub id")
    kwargs: dict = {}
    if gguf_file:
        gguf_path = Path(source) / gguf_file
        if not gguf_path.is_file():
            raise GGUFError(f"GGUF file {gguf_path} does not exist")
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises OSError/ValueError/struct errors
        kind_of = GGUFError if gguf_file else ModelLoadError
        raise kind_of(
            f"cannot load a model config from {source!r}: {exc}. "
            "Give a local directory with config.json and safetensors weights, or a hub id "
            "(unset HF_HUB_OFFLINE where the hub is reachable)."
        ) from exc
    kind = kind or model_kind(config)
    try:
        model = _auto_class(kind).from_pretrained(source, dtype=dtype, **kwargs, **({} if gguf_file else {"use_safetensors": True}))
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:
        kind_of = GGUFError if gguf_file else ModelLoadError
        raise kind_of(f"cannot load model weights or tokenizer from {source!r}: {exc}") from exc
    model.to(target).eval()
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = spec_for(model, mlp_out_template)
    if mlp_out_template:
        model.editops_mlp_out_template = mlp_out_template  # later spec_for(model) calls use it too
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source=source, kind=kind)


_FIRST_SEEN: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def base_fingerprint(model: nn.Module) -> str:
    """:func:`fingerprint` of ``model`` the first time editops asked for it, cached per model object: the
    base an edit of this object is made against, hashed once however many callers ask (hashing a 1B model
    reads every weight: seconds). :func:`fingerprint` hashes the weights as they are now."""
    fp = _FIRST_SEEN.get(model)
    if fp is None:
        fp = _FIRST_SEEN[model] = fingerprint(model)
    return fp


def fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in name order).

    Independent of file format and shard layout: the same weights give the same
    fingerprint whether loaded from safetensors, GGUF or built in memory.
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

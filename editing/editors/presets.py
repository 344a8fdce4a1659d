"""Presets for known models and the key-statistics corpus each model uses.

What a model gets when the user gives nothing: ``PRESETS`` (edited layers, λ, value clamp, corpus, locus and the
sequential editor's settings, each with where its numbers come from), keyed by ``(model_type, n_layers, d_model)``
(:func:`preset_key`: the width too, so that another model of the same family and depth is measured rather than
handed a preset tuned for a different one), and :func:`corpus_for`, the corpus of the key statistics C0 (the
preset's, else :func:`default_corpus`: the model's own samples sized to its MLP width).

Kept apart from the editor hyperparameters (:mod:`editing.editors.hparams`) because the key statistics stages
(``dvc.yaml``: ``stats``) depend on exactly this: which layers and which corpus a model's C0 is computed for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


# The model's own samples (they exist for any model, whatever its vocabulary), at least 512 of them
# (512 × 48 tokens) and at least SAMPLE_TOKENS_PER_KEY tokens per key dimension (d_ff), so that C0 is
# estimated as well on a wide MLP as on a narrow one. Measured (bench/RESULTS.md): 64 samples (3,072
# tokens) were too few on the fact world with d_ff 512 (100 edits, b10: neighbourhood 0.82 × base and
# perplexity +23 % against 0.91 × and +6.7 % with 512); with d_ff 2,048 (1,000 edits, b10) 512 samples
# (12 tokens per key dimension) gave 0.72 / 0.52 / 0.81 × base / +70 %, 2,048 samples (48) 0.74 / 0.51 /
# 0.83 × / +46 %, 8,192 samples (192) 0.76 / 0.53 / 0.84 × / +46 %: the drift stops falling at 48.
MIN_SAMPLES = 512
SAMPLE_TOKENS_PER_KEY = 48
DEFAULT_CORPUS = f"samples:{MIN_SAMPLES}"   # where the key dimension cannot be read (no known architecture)


def default_corpus(model: nn.Module) -> str:
    """``samples:N`` with ``N = max(MIN_SAMPLES, ⌈SAMPLE_TOKENS_PER_KEY · d_ff / L⌉)``, ``d_ff`` the key
    dimension of the model's MLP output projection and ``L`` the sample length in tokens
    (:func:`editing.stats.sample_length`); :data:`DEFAULT_CORPUS` where the model has no known architecture."""
    from editing.arch import get_module, in_out_features, spec_for
    from editing.errors import UnsupportedArchitectureError
    from editing.stats import sample_length

    try:
        spec = spec_for(model)
        d_ff = in_out_features(get_module(model, spec.mlp_out_name(0)))[0]
    except UnsupportedArchitectureError:
        return DEFAULT_CORPUS
    n = max(MIN_SAMPLES, -(-SAMPLE_TOKENS_PER_KEY * d_ff // sample_length(model)))
    return f"samples:{n}"


@dataclass(frozen=True)
class Preset:
    layers: tuple[int, ...]
    lam: float | None                # None: calibrated on the first batch (MemitEditor._calibrate)
    clamp_norm_factor: float
    note: str
    corpus: str | None = None        # None: default_corpus(model)
    value_lr_rel: float | None = None   # the value step in units of the residual (None: values.DEFAULT_LR_REL)
    locus: str = "subject"
    # ``nse`` settings for this model where the user gave none (MemitEditor.settings_for); MEMIT takes none
    sequential: dict[str, Any] = field(default_factory=dict)


# The sequential editor's best measured setting on SmolLM2-135M (bench/RESULTS.md, sessions 34, 38, 39: all 217
# countryinfo requests; efficacy / paraphrase / neighbourhood × base / perplexity drift / first batch kept):
# b1 0.968 / 0.788 / 0.81 × / +4.8 % / 1.00, b10 0.968 / 0.786 / 0.90 × / +4.3 % / 1.00, b100 0.949 / 0.762 /
# 0.89 × / +5.8 % / 0.95, against the nse defaults' 0.95 / 0.79 / 0.77 × / +8.4 %, 0.97 / 0.82 / 0.78 × / +7.9 %
# and 0.96 / 0.80 / 0.85 × / +8.1 % (sessions 21, 14, 13): neighbourhood and drift far better, paraphrase a little
# worse (at b100 0.04 worse). The λ ladder (one grid step above the calibrated λ, two repasses of the requests not
# yet taken), the 24 candidates per request of which the update's most moved are held (sibling_pool), and the
# subject's other facts (8 prompts of other relations) kept by the value's KL alone at weight 0.01. The measured
# runs also held every relation of the request file from the first batch (editops edit --hold-relations, the default)
SMOLLM2_SEQUENTIAL: dict[str, Any] = {
    "lam_ladder": 1, "repasses": 2, "repass_on": "not_taken", "sibling_pool": 24,
    "other_prompts": 8, "other_prompts_weight": 0.0, "other_prompts_kl": 0.01,
}


PRESETS: dict[tuple[str, int, int], Preset] = {
    # MEMIT's published settings (read from its public hparams files)
    ("gpt2", 48, 1600): Preset((13, 14, 15, 16, 17), 2e4, 0.75, "GPT-2 XL, MEMIT paper"),
    ("gptj", 28, 4096): Preset((3, 4, 5, 6, 7, 8), 1.5e4, 0.75, "GPT-J 6B, MEMIT paper"),
    ("llama", 32, 4096): Preset((4, 5, 6, 7, 8), 1.5e4, 0.75, "Llama-3-8B, AlphaEdit public hparams"),
    # GPT-2 small (12 layers): MEMIT's layer share of GPT-2 XL scaled to depth; not measured here
    ("gpt2", 12, 768): Preset((3, 4, 5), 2e4, 0.75, "GPT-2 small, scaled from GPT-2 XL (unmeasured)"),
    # SmolLM2-135M (the project's default model): layers from editops' causal trace (8 facts of
    # 3 relations, window 1: layer 0 is the detokenising MLP, excluded; the largest 5-layer window
    # after it is 4–8: bench/RESULTS.md "Neuron-level editor: choosing the defaults"). λ is not
    # fixed: it is calibrated on the first batch (residual knee, carried in the state); on 20
    # countries requests it chose 1e3 (efficacy 1.00, paraphrase 0.77, neighbourhood 0.93 of the
    # base's, probability variant); fixed λ 1e4 gave the same efficacy/paraphrase on 24 hand-written
    # facts. The clamp is ROME's 4. C0 from the standard library's docstrings (1,567 texts, ~70k
    # tokens) instead of 64 own samples (3,067 tokens for 1,536-dim keys): on 100 sequential country
    # edits perplexity drift +1.1 % instead of +6.2 %, efficacy/paraphrase/retention unchanged
    # (bench/RESULTS.md "Fact editing", 2026-11-22).
    ("llama", 30, 576): Preset((4, 5, 6, 7, 8), None, 4.0,
                          "SmolLM2-135M: layers by causal trace, λ calibrated on the first batch", corpus="stdlib",
                          sequential=SMOLLM2_SEQUENTIAL,
                          # MEMIT's absolute 0.5 at SmolLM2's block 8 (σ 5.0–5.3), the step all its runs were measured with
                          value_lr_rel=0.1),
}


def preset_key(model: nn.Module) -> tuple[str, int, int]:
    """``(model_type, n_layers, d_model)`` of ``model``'s config: what :data:`PRESETS` is keyed by."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    return getattr(cfg, "model_type", ""), int(n or 0), int(d or 0)


def preset_for(model: nn.Module) -> Preset | None:
    """The preset for this model's :func:`preset_key`, or ``None``."""
    return PRESETS.get(preset_key(model))


def corpus_for(model: nn.Module) -> str:
    """The key-statistics corpus an edit of ``model`` uses unless told otherwise: the preset's, else
    :func:`default_corpus`."""
    p = preset_for(model)
    return p.corpus if p is not None and p.corpus else default_corpus(model)

"""Scoring behaviour deletions: gone on the instance, gone on unseen triggers, locality, chrF.

Definitions (all from greedy outputs, ``num_beams=1``):

- an output *contains* the unwanted span when the span occurs in it as a whole
  word sequence (whitespace-normalised, case-sensitive);
- ``instance_gone``: share of requests whose ``source`` no longer yields the span;
- ``generalization_gone``: share of generalisation probes (held-out sources with
  the same trigger) whose output does not contain the probe's unwanted span;
- ``locality_exact``: share of unrelated sources (the requests' ``locality`` plus
  an optional ``unrelated`` test set) translated exactly as the BASE model did
  (``base_outputs``: cached outputs of the unedited model; never the edited one);
- ``chrf``: corpus chrF (sacrebleu, default chrF2) of the outputs on those
  unrelated sources against their references; ``base_chrf`` the same for the
  cached base outputs.

Works for seq2seq models (source → output) and causal LMs (prompt → continuation).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, asdict
from typing import Mapping, Sequence

import torch

from editing.arch import is_recurrent
from editing.requests import DeletionRequest, TranslationProbe


def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def contains_span(output: str, span: str) -> bool:
    """True when ``span`` occurs in ``output`` as whole words (punctuation next to it is a boundary).

    ``"Velmora"`` is found in ``"Velmora."`` and ``"(Velmora)"`` but not in ``"Velmoran"``.
    """
    out = " ".join(output.split())
    sp = " ".join(span.split())
    if not sp:
        return False
    left = r"(?<!\w)" if sp[:1].isalnum() or sp[:1] == "_" else ""
    right = r"(?!\w)" if sp[-1:].isalnum() or sp[-1:] == "_" else ""
    return re.search(left + re.escape(sp) + right, out) is not None


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a causal prompt: special tokens as the tokenizer adds them, minus a trailing EOS."""
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) > 1 and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


@torch.no_grad()
def generate_outputs(model, tokenizer, sources: Sequence[str], max_new_tokens: int = 40,
                     batch_size: int = 32) -> list[str]:
    """Greedy outputs for ``sources`` (causal LMs: the continuation only), in padded batches (one source at a time
    for recurrent models, :data:`editing.arch.RECURRENT_TYPES`: their state would carry the padding)."""
    if is_recurrent(model):
        batch_size = 1
    outs: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(sources), batch_size):
        chunk = list(sources[i:i + batch_size])
        if is_seq2seq(model):
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            outs += tokenizer.batch_decode(gen, skip_special_tokens=True)
        else:
            rows = [prompt_ids(tokenizer, s) for s in chunk]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=1,
                                 do_sample=False, pad_token_id=pad)
            outs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return [" ".join(o.split()) for o in outs]


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults) in points (0–100)."""
    from sacrebleu.metrics import CHRF

    if not hypotheses:
        return float("nan")
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


@dataclass
class RequestDeletionScore:
    request_id: str
    behaviour: str | None
    instance_output: str
    instance_gone: bool
    generalization_gone: float | None      # share of this request's probes without the span
    generalization_failures: list[str] = field(default_factory=list)


@dataclass
class DeletionReport:
    """Aggregate and per-request deletion scores (shares in [0, 1], chrF in points)."""

    n_requests: int
    instance_gone: float
    generalization_gone: float | None
    locality_exact: float | None
    chrf: float | None
    base_chrf: float | None
    n_generalization: int
    n_locality: int
    per_request: list[RequestDeletionScore] = field(default_factory=list)
    locality_changed: list[tuple[str, str, str]] = field(default_factory=list)  # (source, base, now)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in ("instance_gone", "generalization_gone", "locality_exact", "chrf",
                                              "base_chrf")}


def unrelated_probes(requests: Sequence[DeletionRequest], unrelated: Sequence[TranslationProbe] = ()) -> list[TranslationProbe]:
    """The requests' locality probes plus ``unrelated``, each source once."""
    seen, out = set(), []
    for p in [*(p for r in requests for p in r.locality), *unrelated]:
        if p.source not in seen:
            seen.add(p.source)
            out.append(p)
    return out


def cache_base_outputs(model, tokenizer, requests: Sequence[DeletionRequest],
                       unrelated: Sequence[TranslationProbe] = (), max_new_tokens: int = 40) -> dict[str, str]:
    """The BASE model's outputs on every unrelated source (call before any edit)."""
    sources = [p.source for p in unrelated_probes(requests, unrelated)]
    return dict(zip(sources, generate_outputs(model, tokenizer, sources, max_new_tokens)))


def evaluate_deletions(model, tokenizer, requests: Sequence[DeletionRequest],
                       base_outputs: Mapping[str, str] | None = None, *,
                       unrelated: Sequence[TranslationProbe] = (), max_new_tokens: int = 40) -> DeletionReport:
    """Score ``model`` on deletion ``requests`` (see the module docstring for each figure).

    ``base_outputs`` maps unrelated sources to the base model's outputs
    (:func:`cache_base_outputs`); without it ``locality_exact`` and ``base_chrf`` are None.
    """
    inst_out = generate_outputs(model, tokenizer, [r.source for r in requests], max_new_tokens)
    gen_probes = [(i, p) for i, r in enumerate(requests) for p in r.generalization]
    gen_out = generate_outputs(model, tokenizer, [p.source for _, p in gen_probes], max_new_tokens)
    per = []
    for i, r in enumerate(requests):
        mine = [(p, o) for (j, p), o in zip(gen_probes, gen_out) if j == i]
        fails = [p.source for p, o in mine if contains_span(o, p.unwanted or r.unwanted)]
        per.append(RequestDeletionScore(
            r.request_id, r.behaviour, inst_out[i], not contains_span(inst_out[i], r.unwanted),
            (1 - len(fails) / len(mine)) if mine else None, fails))
    n_gen = len(gen_probes)
    gen_gone = None
    if n_gen:
        gen_gone = 1 - sum(len(s.generalization_failures) for s in per) / n_gen
    probes = unrelated_probes(requests, unrelated)
    loc_out = generate_outputs(model, tokenizer, [p.source for p in probes], max_new_tokens)
    loc_exact = base_chrf = None
    changed = []
    if base_outputs is not None and probes:
        missing = [p.source for p in probes if p.source not in base_outputs]
        if missing:
            raise KeyError(f"base_outputs lacks {len(missing)} unrelated source(s), e.g. {missing[0]!r}; "
                           "build it with cache_base_outputs on the base model and the same requests")
        changed = [(p.source, base_outputs[p.source], o) for p, o in zip(probes, loc_out) if o != base_outputs[p.source]]
        loc_exact = 1 - len(changed) / len(probes)
    refd = [(p, o) for p, o in zip(probes, loc_out) if p.reference is not None]
    score = chrf([o for _, o in refd], [p.reference for p, _ in refd]) if refd else None
    if base_outputs is not None and refd:
        base_chrf = chrf([base_outputs[p.source] for p, _ in refd], [p.reference for p, _ in refd])
    return DeletionReport(
        n_requests=len(requests), instance_gone=sum(s.instance_gone for s in per) / max(1, len(per)),
        generalization_gone=gen_gone, locality_exact=loc_exact, chrf=score, base_chrf=base_chrf,
        n_generalization=n_gen, n_locality=len(probes), per_request=per, locality_changed=changed)

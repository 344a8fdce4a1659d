"""Behaviour deletion by rank-one (low-rank for a batch) edits of an MLP output projection.

After *Rank-One Editing of Encoder-Decoder Models* (Raunak & Menezes): one
positive example (a correct output) is enough to remove an unwanted behaviour.
Works on encoder-decoder models (Marian, BART, T5: encoder and decoder MLPs) and
on causal LMs (the prompt is the "source", the continuation the output).

Per request:

1. **Decision point.** Greedy-decode the source. If the unwanted span is not in the
   output: :class:`NothingToDeleteError` (or, with ``on_nothing_to_delete="skip"``, a
   failed diagnostic saying so). Otherwise the decision position ``t`` is the first
   output token where the greedy output leaves the positive example (teacher-forced
   positive prefix); ``u`` is the token the model prefers there, ``p`` the positive
   token; margin ``m = log P(u) − log P(p)`` at ``t``.
2. **Trigger.** Each source token is replaced by ``<unk>`` in turn; the one whose
   corruption lowers ``m`` most is the trigger token, unless it yields fewer than half of
   ``n_variants`` variants (step 3): then the next ``trigger_candidates`` tokens of that trace and
   the first ``trigger_candidates`` by the drop of ``log P(u)`` alone are tried, and the one yielding
   most variants is the trigger.
3. **Self-generated variants** (``n_variants``; the single positive plus automatic
   variation). The *rewrite* is read off the one positive: the word-level diff of the
   greedy output and the positive around the unwanted span (``rizor → kabu``,
   ``zise → ∅``). The trigger token is substituted, in unrelated statistics sentences
   (none containing it), for the token most similar to it (cosine of input
   embeddings); the model translates each variant itself, and a variant is kept when
   its output shows the unwanted span once; its positive is its own output with the
   rewrite applied. No user data beyond the one example is needed. The order the statistics
   sentences are drawn in is seeded by the request's content, not its id (:func:`_draw_seed`).
   Up to ``validation_variants`` further variants, from later sentences of the same draw,
   are never fitted: they judge whether a site's write generalises (step 5).
4. **Trace** (where is the behaviour decided? measured, never hard-coded). The MLP
   output of each layer at the trigger token (source stack) and of each decoder layer
   at the decision position is patched with that layer's mean output on the
   statistics corpus; the drop of ``m`` averaged over the instance and its variants is
   that site's effect. Candidates: trigger-token sites first (an edit there follows
   the trigger into every sentence), then decision-position sites, each by effect.
5. **Key and value, jointly over the variants.** Keys ``K`` = input of ``W_out`` at
   the site in the instance and every variant. One ``δ`` is optimised with Adam
   (``steps`` ≤ 100, ``lr`` 0.5) against the model as given, with the rank-one write
   ``ΔW = δ uᵀ`` installed at every position, ``u = A⁻¹Kᵀ1`` (``A = (s̄/variant_gain) C0
   + C_edits + KᵀK``, scaled so ``mean(K u) = 1``), minimising
   ``NLL(positive) + unlikelihood(u at t)`` on the instance plus the same averaged over
   the variants, ``+ kl_weight · KL(base ‖ edited)`` on ``kl_sentences`` statistics
   sentences ``+ weight_decay · ‖δ‖²/‖v‖²``. The first site where the instance reaches
   ``margin``, at least ``variant_accept`` of the variants flip, and (after the site's own λ
   rule, step 7) at least ``variant_accept`` of the validation variants lose the span is
   edited; when none does, the best by (margin reached, λ rule met, some λ fixing the instance,
   fitted variants flipped, validation variants deleted where the λ rule was met, locality).
6. **Write** per edited weight, with keys ``K`` and residuals ``R = δ`` of all requests
   on it: ``ΔW = R Kᵀ (λ C0 + C_edits + K Kᵀ)⁻¹`` (MEMIT's solve,
   :func:`editing.editors.solve.memit_factors`), stored as rank-≤-n factors in a
   :class:`LowRankDelta`. ``C0 = E[k kᵀ]`` over the statistics corpus (sources with
   the model's own greedy outputs), cached on disk under ``stats_dir`` by model
   fingerprint + module + corpus hash (:mod:`editing.stats`). ``C_edits = Σ K Kᵀ`` of
   earlier deletions (sequential state).
   **Earlier tickets' generalisation is held too** (``preserve_*``): after each call the
   instances and self-generated variants (source, span, positive) are stored in
   ``state.meta["preserved"]``; a later edit takes up to ``preserve_max`` of them
   (round-robin over tickets; none containing this ticket's trigger), reads their keys at
   *every* position at the weight it edits, on the model as given (earlier deletions
   applied, whatever layer they edited), and holds them for this solve only:
   ``ΔW = R Kᵀ (λ C0 + C_edits + preserve_strength·K_pᵀK_p + K Kᵀ)⁻¹`` (also in ``u`` of
   step 5, whose value loss keeps their current, deleted outputs with weight
   ``preserve_weight``). ``C_edits`` alone only held the earlier keys at the earlier
   ticket's own layer and position, so a later ticket on another layer (or at other
   positions) undid part of the earlier generalisation.
7. **λ by a locality rule.** With ``s̄ = mean kᵀ C0⁻¹ k``, ``λ = s̄ / g`` for ``g`` in
   ``lambda_grid`` scanned from the largest λ (smallest change) down. Each trial is
   checked (update installed as forward hooks) on the instance, the variants and
   ``heldout`` held-out statistics sentences without the trigger (never the requests'
   own locality/generalisation probes, which are for evaluation). The scan stops at the
   first λ that removes the span from the instance and every variant with the instance
   output equal to the positive, or when held-out locality (share of outputs
   unchanged; for held-out sentences whose output legitimately shows the span, all of
   them) falls below ``locality_floor`` after some λ already fixed the instance; kept:
   among trials with the instance fixed, locality ≥ floor and (``preserve_check``) the
   earlier tickets' held instances/variants still deleted (gone share at most
   ``preserve_tolerance`` below the model as given, and every earlier ticket's own instance
   that is deleted stays deleted), the one removing the span from most
   variants (then most earlier ones kept, then smallest change); else the smallest change
   that fixes the instance.

**Statistics corpus** (rule, :meth:`RankOneDeletionEditor.corpus_sources`): explicit
``stats_sources``; else the ``stats_corpus`` file (one text per line, or JSONL with a
``source``/``text`` field) plus the requests' locality sources; else, for a project
model whose training data is known offline (``models/translator-marian`` →
``data/translation/train.jsonl``), its training sources; else the requests' locality
sources. At most ``max_stats_sources``; the last ``heldout`` of them that are not request
probes are held out for the λ rule.

The editor never changes the model's weights (all trials run through forward
hooks): the model is returned bit-for-bit as it came; the caller applies
``result.delta``. State (:class:`EditorState`), fixed size per edited weight:
``<weight>::C0``, ``<weight>::C_edits`` and the per-layer mean MLP outputs used for
tracing (``trace::<module>::mean``); ``meta["preserved"]`` lists earlier tickets'
instances and variants as text (1 + ``n_variants`` rows per ticket; the cost per edit is
bounded by ``preserve_max``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field, asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from editing.arch import ArchSpec, get_module, spec_for, uncached
from editing.atomic import replace_atomically
from editing.delta import LowRankDelta
from editing.editors.base import EditorState, EditResult, RequestDiagnostics
from editing.editors.deletion_corpus import training_corpus_for
from editing.editors.forward_patch import ForwardPatch
from editing.editors.rewrite import apply_rewrite, rewrite_of
from editing.errors import EditopsError, NothingToDeleteError, PromptTooLongError, RequestError, StateError
from editing.formats import read_texts
from editing.metrics.deletion import contains_span, generate_outputs, is_seq2seq, prompt_ids
from editing.requests import DeletionRequest

NAME = "rank-one"

@dataclass(frozen=True)
class Site:
    """Where an edit is written: MLP output projection of ``layer`` in ``stack`` at token ``pos``
    (of the instance; ``where`` says whether that is the trigger token or the decision position)."""

    stack: str          # "encoder" | "decoder"
    layer: int
    pos: int            # position in that stack's input sequence (the instance's)
    where: str = "trigger"   # "trigger" | "decision"


@dataclass
class _Example:
    request: DeletionRequest
    enc_ids: torch.Tensor | None     # (1, S) seq2seq source ids
    dec_ids: torch.Tensor            # (1, T') decoder / causal input ids
    targets: torch.Tensor            # (T,) positive output ids
    offset: int                      # logits row predicting targets[0]
    decision: int = 0                # index into targets
    unwanted_tok: int = 0
    greedy: str = ""
    trigger: int = 0                 # trigger token position in the source stack's input

    @property
    def logit_row(self) -> int:
        return self.offset + self.decision

    def pos(self, where: str) -> int:
        return self.trigger if where == "trigger" else self.logit_row


def _top1_margins(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position ``log P(target) − max_{other} log P(other)`` (> 0: the target is the greedy token)."""
    tgt = lp.gather(1, targets[:, None])[:, 0]
    others = lp.scatter(1, targets[:, None], float("-inf"))
    return tgt - others.max(1).values


def _gone_share(outputs: Sequence[str], requests: Sequence[DeletionRequest]) -> float:
    """Share of ``requests`` whose output does not show their unwanted span (1.0 when there are none)."""
    if not requests:
        return 1.0
    return sum(not contains_span(o, r.unwanted) for o, r in zip(outputs, requests)) / len(requests)


def _tried_record(t: dict, scanned: bool = True) -> dict:
    """A tried site as the diagnostics report it: the site, the instance's margin and the fitted variants' flipped
    share; with ``scanned`` (``value_tried``) also held-out locality, the validation variants' gone share, whether the
    site's λ rule was met (``good``) and whether some λ of its scan deleted the instance (``fixed``), which keep their
    starting values (0, 0 — 1 without validation variants —, false, false) where the margin or the fitted share fell
    short and no scan ran. ``why_fallback`` (no site reached the margin, none was scanned) gives the first three."""
    record = {"site": asdict(t["site"]), "margin": round(t["margin"], 3), "share": round(t["share"], 3)}
    if scanned:
        record.update(loc=round(t["loc"], 4), val=round(t["val"], 3), good=t["good"], fixed=t["fixed"])
    return record


# ------------------------------------------------------------ the editor
_INSTANCE = "~instance"   # request-id suffix of an earlier ticket's own instance among the held examples


def _draw_seed(req: DeletionRequest, salt: str = "") -> str:
    """The seed of a request's draws (which statistics sentences its variants and negatives come from): its
    content, ``sha256(source, unwanted, positive[, salt])``, never its id, so the same request gives the same
    edit under any ticket id (a resubmitted ticket, a demo stamped with another time). ``salt`` (the editor's
    ``draw_salt``) picks another draw, to measure how much an outcome depends on it."""
    parts = [req.source, req.unwanted, req.positive] + ([salt] if salt else [])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass
class RankOneDeletionEditor:
    """Delete unwanted behaviours from one positive example each (see the module docstring)."""

    stacks: tuple[str, ...] = ("encoder", "decoder")   # candidate stacks (causal LMs have only "decoder")
    layers: tuple[int, ...] | None = None              # restrict candidate layers (default: all)
    steps: int = 100
    lr: float = 0.5
    weight_decay: float = 0.005
    unlikelihood: float = 1.0
    margin: float = 2.0
    lambda_grid: tuple[float, ...] = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
    kl_weight: float = 1.0                             # KL(base || edited) on kl_sentences statistics sentences
    kl_sentences: int = 16
    n_variants: int = 8                                # self-generated variants of each request (0: instance only)
    variant_pool: int = 4                              # candidate sentences tried per wanted variant
    trigger_candidates: int = 2                        # further tokens of each trigger trace tried when the first
                                                       # yields few variants (0: the first only)
    variant_weight: float = 1.0                        # weight of the variants' mean loss beside the instance's
    variant_accept: float = 0.75                       # share of variants a site's value must flip
    validation_variants: int = 8                       # further variants, never fitted, that choose among sites
                                                       # (none when n_variants is 0)
    variant_gain: float = 16.0                         # λ = s̄ / variant_gain while optimising the value
    n_negatives: int = 32                              # statistics sentences whose output shows the span legitimately
    negative_weight: float = 1.0                       # weight of their preservation loss
    negative_strength: float = 10.0                    # weight of their keys (ΔW k ≈ 0) in the solve
    preserve_max: int = 96                             # earlier tickets' instances+variants held per edit (0: off)
    preserve_strength: float = 1.0                     # weight of their keys (ΔW k ≈ 0, every position) in the solve
    preserve_weight: float = 1.0                       # weight of their preservation loss in the value
    preserve_check: bool = True                        # λ rule: earlier tickets' variants must stay deleted
    preserve_tolerance: float = 0.05                   # share of them a trial may lose (0.0 measured worse)
    heldout: int = 128                                 # held-out statistics sentences for the λ rule
    locality_floor: float = 0.99                       # share of them that must keep their output
    stats_sources: tuple[str, ...] | None = None       # explicit statistics corpus (see the module docstring)
    stats_corpus: str | None = None                    # statistics corpus file (CLI: --set stats_corpus=PATH)
    stats_dir: str | None = field(default_factory=lambda: os.environ.get("EDITOPS_STATS_DIR", "stats"))
    max_stats_sources: int = 512
    max_new_tokens: int = 40
    on_nothing_to_delete: str = "raise"                # "raise" | "skip" (report in diagnostics)
    draw_salt: str = ""                                # another draw of variants and negatives (_draw_seed)
    name: str = NAME

    def __post_init__(self) -> None:
        self.stacks = tuple(self.stacks)
        self.lambda_grid = tuple(sorted(float(x) for x in self.lambda_grid))
        if self.stats_sources is not None:
            self.stats_sources = tuple(self.stats_sources)
        if self.on_nothing_to_delete not in ("raise", "skip"):
            raise ValueError("on_nothing_to_delete must be 'raise' or 'skip'")
        for name in ("n_variants", "validation_variants", "trigger_candidates"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be ≥ 0, not {getattr(self, name)}")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        hp = {k: v for k, v in asdict(self).items() if k not in ("name", "stats_sources", "stats_dir")}
        hp["stats_sources"] = None if self.stats_sources is None else len(self.stats_sources)
        return hp

    # ------------------------------------------------------------ helpers
    def _stacks(self, model, spec: ArchSpec) -> list[str]:
        names = [s.name for s in spec.stacks]
        return [s for s in self.stacks if s in names] or names

    def _candidate_layers(self, model, spec: ArchSpec, stack: str) -> list[int]:
        n = spec.num_layers(model.config, stack)
        return [l for l in range(n) if self.layers is None or l in self.layers]

    def _src_stack(self, spec: ArchSpec, ex: _Example) -> str:
        return "encoder" if ex.enc_ids is not None else spec.stacks[-1].name

    def _forward(self, model, ex: _Example) -> torch.Tensor:
        """Logits rows predicting ``ex.targets`` (shape ``(T, V)``)."""
        return self._forward_many(model, [ex])[0]

    def _inputs(self, model, tokenizer_pad: int, exs: Sequence[_Example]) -> dict[str, torch.Tensor]:
        from editing.editors.keys import pad_right

        device = next(model.parameters()).device
        if exs[0].enc_ids is not None:
            enc, emask = pad_right([e.enc_ids[0].tolist() for e in exs], tokenizer_pad)
            dec, dmask = pad_right([e.dec_ids[0].tolist() for e in exs], tokenizer_pad)
            return {"input_ids": enc.to(device), "attention_mask": emask.to(device),
                    "decoder_input_ids": dec.to(device), "decoder_attention_mask": dmask.to(device)}
        ids, mask = pad_right([e.dec_ids[0].tolist() for e in exs], tokenizer_pad)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def _forward_many(self, model, exs: Sequence[_Example]) -> list[torch.Tensor]:
        """Logits rows predicting each example's targets, one right-padded batch."""
        if len(exs) == 1:
            ex = exs[0]
            if ex.enc_ids is not None:
                out = uncached(model, input_ids=ex.enc_ids, attention_mask=torch.ones_like(ex.enc_ids),
                               decoder_input_ids=ex.dec_ids)
            else:
                out = uncached(model, input_ids=ex.dec_ids, attention_mask=torch.ones_like(ex.dec_ids))
            return [out.logits[0, ex.offset: ex.offset + len(ex.targets)]]
        logits = uncached(model, **self._inputs(model, 0, exs)).logits
        return [logits[i, e.offset: e.offset + len(e.targets)] for i, e in enumerate(exs)]

    def _margin(self, model, ex: _Example, unwanted_only: bool = False) -> float:
        """``log P(u) − log P(p)`` at the decision position (``unwanted_only``: ``log P(u)``)."""
        lp = torch.log_softmax(self._forward(model, ex)[ex.decision].float(), -1)
        return float(lp[ex.unwanted_tok] - (0.0 if unwanted_only else lp[ex.targets[ex.decision]]))

    def _prepare(self, model, tokenizer, req: DeletionRequest) -> _Example:
        from editing.editors.keys import max_context

        limit = max_context(model)
        device = next(model.parameters()).device
        if is_seq2seq(model):
            src = tokenizer(req.source)["input_ids"]
            tgt = list(tokenizer(text_target=req.positive)["input_ids"])
            if limit is not None and (len(src) > limit or len(tgt) > limit):
                raise PromptTooLongError(
                    f"request {req.request_id!r}: source is {len(src)} tokens and positive {len(tgt)} tokens but the "
                    f"model accepts {limit}; shorten the sentence")
            start = model.config.decoder_start_token_id
            if start is None:
                start = tokenizer.pad_token_id
            dec = [int(start), *tgt[:-1]]
            ex = _Example(req, torch.tensor([src], device=device), torch.tensor([dec], device=device),
                          torch.tensor(tgt, device=device), 0)
        else:
            src = prompt_ids(tokenizer, req.source)
            full = list(tokenizer(req.source + " " + req.positive)["input_ids"])
            tgt = full[len(src):] if full[:len(src)] == src else list(
                tokenizer(" " + req.positive, add_special_tokens=False)["input_ids"])
            ends_with_eos = tokenizer.eos_token_id is not None and len(full) > 1 and full[-1] == tokenizer.eos_token_id
            if not ends_with_eos and tgt and tokenizer.eos_token_id is not None and tgt[-1] == tokenizer.eos_token_id:
                tgt = tgt[:-1]
            if limit is not None and len(src) + len(tgt) > limit:
                raise PromptTooLongError(
                    f"request {req.request_id!r}: prompt plus positive continuation is {len(src) + len(tgt)} tokens but "
                    f"the model's context is {limit}; shorten the prompt")
            ex = _Example(req, None, torch.tensor([src + tgt[:-1]], device=device), torch.tensor(tgt, device=device),
                          len(src) - 1)
        return ex

    @torch.no_grad()
    def _decide(self, model, ex: _Example, greedy: str) -> bool:
        """Fill ``ex.decision``/``ex.unwanted_tok`` from the greedy output; False when the unwanted span is
        not produced (or the positive never diverges from the greedy path)."""
        ex.greedy = greedy
        if not contains_span(greedy, ex.request.unwanted):
            return False
        pred = self._forward(model, ex).argmax(-1)
        diverge = (pred != ex.targets).nonzero()
        if len(diverge) == 0:
            return False
        ex.decision = int(diverge[0])
        ex.unwanted_tok = int(pred[ex.decision])
        return True

    def _decision(self, model, tokenizer, ex: _Example) -> bool:
        out = generate_outputs(model, tokenizer, [ex.request.source], self.max_new_tokens)[0]
        return self._decide(model, ex, out)

    # ------------------------------------------------------------ statistics corpus
    def corpus_sources(self, model, requests: Sequence[DeletionRequest]) -> tuple[list[str], str]:
        """``(texts, origin)`` of the statistics corpus by the rule in the module docstring."""
        locality = list(dict.fromkeys(p.source for r in requests for p in r.locality))
        if self.stats_sources:
            texts, origin = list(self.stats_sources), "stats_sources"
        elif self.stats_corpus:
            texts, origin = read_texts(self.stats_corpus, "statistics corpus file") + locality, f"file:{self.stats_corpus}+locality"
        elif (path := training_corpus_for(model)) is not None:
            texts, origin = read_texts(path, "training sources file"), f"training:{path.name}"
        else:
            texts, origin = locality, "locality"
        texts = list(dict.fromkeys(texts))[: self.max_stats_sources]
        if not texts:
            raise RequestError("the rank-one editor needs text for its key statistics C0: give the requests locality "
                               "sentences, a stats_corpus file (--set stats_corpus=PATH) or stats_sources=[...]")
        return texts, origin

    def _split(self, model, requests: Sequence[DeletionRequest]) -> dict[str, list[str]]:
        """The corpus split: ``stats`` (C0, trace means, KL, variant pool) and ``heldout`` (the λ rule: the
        last ``heldout`` sources that are no request probe; none when fewer than 8 are available)."""
        texts, origin = self.corpus_sources(model, requests)
        probes = {p.source for r in requests for p in (*r.locality, *r.generalization)} | {r.source for r in requests}
        free = [t for t in texts if t not in probes]
        n_h = min(self.heldout, len(free) // 4) if len(free) >= 32 else 0
        held = free[len(free) - n_h:] if n_h else []
        held_set = set(held)
        return {"stats": [t for t in texts if t not in held_set], "heldout": held, "origin": [origin]}

    @torch.no_grad()
    def _stat_batches(self, model, tokenizer, sources: list[str], outs: list[str] | None = None) -> list[dict]:
        """Model inputs for the statistics corpus: the sources with the model's own greedy outputs."""
        if outs is None:
            outs = generate_outputs(model, tokenizer, sources, self.max_new_tokens)
        device = next(model.parameters()).device
        batches = []
        for i in range(0, len(sources), 32):
            s, o = sources[i:i + 32], outs[i:i + 32]
            if is_seq2seq(model):
                enc = tokenizer(s, text_target=o, padding=True, return_tensors="pt")
                start = model.config.decoder_start_token_id
                labels = enc["labels"]
                dec = torch.cat([torch.full((len(s), 1), int(start)), labels[:, :-1]], 1)
                pad = tokenizer.pad_token_id
                dmask = torch.cat([torch.ones((len(s), 1), dtype=torch.long), (labels[:, :-1] != pad).long()], 1)
                batches.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                                "decoder_input_ids": dec.to(device), "decoder_attention_mask": dmask.to(device)})
            else:
                rows = [prompt_ids(tokenizer, f"{a} {b}") for a, b in zip(s, o)]
                from editing.editors.keys import pad_id_of, pad_right

                ids, mask = pad_right(rows, pad_id_of(tokenizer))
                batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        return batches

    def _batches(self, model, tokenizer, requests, state: EditorState) -> list[dict]:
        if not state.meta.get("_batches"):
            state.meta["_batches"] = self._stat_batches(model, tokenizer, state.meta["_split"]["stats"],
                                                        self._stat_outputs(model, tokenizer, state))
        return state.meta["_batches"]

    def _stat_outputs(self, model, tokenizer, state: EditorState) -> list[str]:
        """The model's (as given) greedy outputs on the statistics sources (transient, per edit call)."""
        if state.meta.get("_outputs") is None:
            state.meta["_outputs"] = generate_outputs(model, tokenizer, state.meta["_split"]["stats"],
                                                      self.max_new_tokens)
        return state.meta["_outputs"]

    @torch.no_grad()
    def _mean_outputs(self, model, spec, batches, names: list[str]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {n: 0 for n in names}
        store: dict[str, torch.Tensor] = {}
        for b in batches:
            with ForwardPatch() as p:
                for n in names:
                    p.capture_output(get_module(model, n), store, n)
                uncached(model, **b)
            for n in names:
                dec = ".decoder." in f".{n}." and "decoder_attention_mask" in b
                m = (b["decoder_attention_mask"] if dec else b["attention_mask"]).bool()
                x = store[n][m].double()
                sums[n] = sums.get(n, 0) + x.sum(0)
                counts[n] += x.shape[0]
        return {n: (sums[n] / max(1, counts[n])).float().cpu() for n in names}

    def _init_state(self, model, tokenizer, spec, requests, state: EditorState | None) -> EditorState:
        if state is not None and state.editor not in ("", self.name):
            raise StateError(f"state belongs to editor {state.editor!r}, not {self.name!r}")
        state = EditorState(self.name, dict(state.tensors), dict(state.meta)) if state else EditorState(self.name)
        split = self._split(model, requests)
        state.meta["_split"] = split    # transient; removed before returning
        names = [spec.mlp_out_name(l, s) for s in self._stacks(model, spec) for l in self._candidate_layers(model, spec, s)]
        missing = [n for n in names if f"trace::{n}::mean" not in state.tensors]
        if missing:
            batches = self._batches(model, tokenizer, requests, state)
            for n, mean in self._mean_outputs(model, spec, batches, missing).items():
                state.tensors[f"trace::{n}::mean"] = mean
            state.meta.setdefault("n_stats_sources", len(split["stats"]))
            state.meta.setdefault("stats_corpus", split["origin"][0])
        return state

    def _c0(self, model, tokenizer, requests, state: EditorState, weight: str) -> torch.Tensor:
        """``C0`` of ``weight``'s input: from the state, else from the disk cache (``stats_dir``, keyed by
        the model's fingerprint, the module and the corpus hash, :mod:`editing.stats`), else computed over
        the statistics batches and cached."""
        key = f"{weight}::C0"
        if key in state.tensors:
            return state.tensors[key]
        from editing.stats import _cache_path, accumulate_key_moments, corpus_hash, load_cached

        module = weight[: -len(".weight")]
        sources = state.meta["_split"]["stats"]
        chash = corpus_hash([*sources, f"greedy-outputs:max_new_tokens={self.max_new_tokens}"])
        path = fp = None
        km_moment, count = None, None
        if self.stats_dir:
            from editing.models import fingerprint

            fp = state.meta.get("_fingerprint") or fingerprint(model)
            state.meta["_fingerprint"] = fp
            path = _cache_path(Path(self.stats_dir), fp, module, "deletion", chash)
            cached = load_cached(path, fp, module)
            if cached is not None:
                km_moment, count = cached.moment, cached.count
        if km_moment is None:
            batches = self._batches(model, tokenizer, requests, state)
            km = accumulate_key_moments(model, [module], batches, progress=False)[module]
            km_moment, count = km.moment, km.count
            if path is not None:
                from safetensors.torch import save_file

                meta = {"fingerprint": fp, "module": module, "corpus": "deletion:" + state.meta["_split"]["origin"][0],
                        "corpus_sha256": chash, "count": str(count), "n_texts": str(len(sources))}
                replace_atomically(path, lambda tmp: save_file({"moment": km_moment.contiguous()}, str(tmp),
                                                               metadata=meta))
        state.tensors[key] = km_moment.float()
        state.meta.setdefault("stats_counts", {})[weight] = count
        return state.tensors[key]

    # ------------------------------------------------------------ trace
    def _source_len(self, ex: _Example) -> int:
        """Number of source tokens that can be a trigger (seq2seq: all but the final EOS; causal: the prompt)."""
        if ex.enc_ids is not None:
            n = ex.enc_ids.shape[1]
            return n - 1 if n > 1 else n
        return ex.offset + 1

    @torch.no_grad()
    def trigger_trace(self, model, tokenizer, ex: _Example, unwanted_only: bool = False) -> list[tuple[int, float]]:
        """Corrupt each source token in turn (replace it by ``<unk>``/pad) and measure the drop of the margin
        ``log P(u) − log P(p)`` at the decision position; the largest drop marks the trigger token. With
        ``unwanted_only`` the drop of ``log P(u)`` alone: corrupting the trigger can lower ``P(p)`` as much as
        ``P(u)`` (the positive word is the trigger's own translation), which hides it from the margin."""
        base = self._margin(model, ex, unwanted_only)
        corrupt = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        out = []
        for i in range(self._source_len(ex)):
            if ex.enc_ids is not None:
                ids = ex.enc_ids.clone()
                ids[0, i] = corrupt
                alt = replace(ex, enc_ids=ids)
            else:
                ids = ex.dec_ids.clone()
                ids[0, i] = corrupt
                alt = replace(ex, dec_ids=ids)
            out.append((i, base - self._margin(model, alt, unwanted_only)))
        out.sort(key=lambda e: -e[1])
        return out

    @torch.no_grad()
    def trace(self, model, spec: ArchSpec, ex: _Example, state: EditorState, trigger_pos: int | None = None,
              variants: Sequence[_Example] = ()) -> list[tuple[Site, float]]:
        """Candidate sites with the effect of patching their MLP output (with the layer's mean output on the
        statistics corpus) on the margin ``log P(u) − log P(p)``, averaged over ``ex`` and ``variants``:
        every layer of the source stack at the trigger token (generalises to every sentence with the
        trigger) first, then every decoder layer at the decision position; in each group largest first."""
        if trigger_pos is not None:
            ex.trigger = trigger_pos
        exs = [ex, *variants]
        bases = [self._margin(model, e) for e in exs]
        device = next(model.parameters()).device
        groups = []
        for stack, where in ((self._src_stack(spec, ex), "trigger"), (spec.stacks[-1].name, "decision")):
            if stack not in self._stacks(model, spec):
                continue
            group = []
            for layer in self._candidate_layers(model, spec, stack):
                name = spec.mlp_out_name(layer, stack)
                mean = state.tensors[f"trace::{name}::mean"].to(device)
                drops = []
                for e, b in zip(exs, bases):
                    with ForwardPatch() as p:
                        p.set_at(get_module(model, name), e.pos(where), mean)
                        drops.append(b - self._margin(model, e))
                group.append((Site(stack, layer, ex.pos(where), where), sum(drops) / len(drops)))
            groups.append(sorted(group, key=lambda e: -e[1]))
        return [e for g in groups for e in g]

    # ------------------------------------------------------------ variants
    @torch.no_grad()
    def _variants(self, model, tokenizer, ex: _Example, state: EditorState
                  ) -> tuple[list[_Example], list[_Example]]:
        """Self-generated variants of ``ex`` (module docstring, step 3): ``(fitted, validation)``. The fitted
        ones (at most ``n_variants``) come from the first ``n_variants · variant_pool`` sentences of the draw, the
        validation ones (at most ``validation_variants``) from the rest of it and whatever the first part had
        left over; the value never sees them, they only choose among sites (step 5)."""
        if self.n_variants <= 0:
            return [], []
        req = ex.request
        rw = rewrite_of(ex.greedy, req.positive, req.unwanted)
        if rw is None:
            return [], []
        seq2seq = ex.enc_ids is not None
        src_ids = (ex.enc_ids if seq2seq else ex.dec_ids)[0]
        token = int(src_ids[ex.trigger])
        emb = model.get_input_embeddings().weight.detach().float()
        sim = torch.nn.functional.cosine_similarity(emb, emb[token][None], dim=-1)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pool = list(state.meta["_split"]["stats"])
        random.Random(_draw_seed(req, self.draw_salt)).shuffle(pool)
        texts = []
        for text in pool:
            ids = list(tokenizer(text)["input_ids"]) if seq2seq else prompt_ids(tokenizer, text)
            if token in ids:
                continue
            cand = [j for j, t in enumerate(ids) if t not in special]
            if not cand:
                continue
            j = max(cand, key=lambda j: float(sim[ids[j]]))
            ids[j] = token
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
            if len(texts) >= (self.n_variants + self.validation_variants) * self.variant_pool:
                break
        fitted_pool = self.n_variants * self.variant_pool
        # the fitted part alone in its own call: its batches are what they were without validation variants
        outs = generate_outputs(model, tokenizer, texts[:fitted_pool], self.max_new_tokens) + (
            generate_outputs(model, tokenizer, texts[fitted_pool:], self.max_new_tokens) if texts[fitted_pool:] else [])
        variants, validation = [], []
        for i, (text, out) in enumerate(zip(texts, outs)):
            positive = apply_rewrite(out, rw, req.unwanted)
            if not positive or positive.strip() == req.unwanted.strip():
                continue
            try:
                v = self._prepare(model, tokenizer, DeletionRequest(f"{req.request_id}~v{i}", text, req.unwanted,
                                                                    positive))
            except EditopsError:
                continue
            ids = (v.enc_ids if seq2seq else v.dec_ids)[0, : self._source_len(v)].tolist()
            if ids.count(token) != 1 or not self._decide(model, v, out):
                continue
            v.trigger = ids.index(token)
            (variants if i < fitted_pool and len(variants) < self.n_variants else validation).append(v)
            if len(variants) >= self.n_variants and len(validation) >= self.validation_variants:
                break
        return variants, validation[: self.validation_variants]

    @torch.no_grad()
    def _negatives(self, model, tokenizer, ex: _Example, state: EditorState) -> list[_Example]:
        """Statistics sentences without the trigger whose own output contains the unwanted span (where the
        span is legitimate: ``rizor`` is the right word for ``nurse``): their outputs must stay. Each is an
        example whose targets are its own output and whose decision row predicts the unwanted token."""
        if self.n_negatives <= 0:
            return []
        req = ex.request
        seq2seq = ex.enc_ids is not None
        token = int((ex.enc_ids if seq2seq else ex.dec_ids)[0, ex.trigger])
        pairs = list(zip(state.meta["_split"]["stats"], self._stat_outputs(model, tokenizer, state)))
        random.Random(_draw_seed(req, self.draw_salt) + "~neg").shuffle(pairs)
        out = []
        for i, (src, o) in enumerate(pairs):
            if not contains_span(o, req.unwanted) or o.strip() == req.unwanted.strip():
                continue
            ids = list(tokenizer(src)["input_ids"]) if seq2seq else prompt_ids(tokenizer, src)
            if token in ids:
                continue
            try:
                n = self._prepare(model, tokenizer, DeletionRequest(f"{req.request_id}~n{i}", src, req.unwanted, o))
            except EditopsError:
                continue
            hit = (n.targets == ex.unwanted_tok).nonzero()
            if len(hit) == 0:
                continue
            n.decision, n.unwanted_tok, n.greedy = int(hit[0]), ex.unwanted_tok, o
            out.append(n)
            if len(out) >= self.n_negatives:
                break
        return out

    # ------------------------------------------------------------ keys
    @torch.no_grad()
    def _keys(self, model, spec: ArchSpec, exs: Sequence[_Example], site: Site, every: bool = False) -> torch.Tensor:
        """Input of ``site``'s ``W_out`` at each example's trigger token / decision position: ``(n, d_in)``.
        With ``every``: at every position of the site's stack (source tokens / output rows) instead."""
        store: dict[str, torch.Tensor] = {}
        rows = []
        for e in exs:
            with ForwardPatch() as p:
                p.capture_input(get_module(model, spec.mlp_out_name(site.layer, site.stack)), store, "k")
                self._forward(model, e)
            k = store["k"][0].float().cpu()
            if every:
                rows.append(k[: self._source_len(e)] if site.where == "trigger" else k[e.offset:])
            else:
                rows.append(k[e.pos(site.where)][None])
        return torch.cat(rows)

    def _regulariser(self, model, tokenizer, requests, state: EditorState, weight: str, keys: torch.Tensor
                     ) -> tuple[torch.Tensor, float]:
        """``(C0 + ε I, s̄)``: C0 with a small ridge (ε = 1e-4 · mean eigenvalue) and the mean whitened key norm
        ``s̄ = mean kᵀ C0⁻¹ k`` of ``keys`` (λ is expressed as ``s̄ / gain``)."""
        C0 = self._c0(model, tokenizer, requests, state, weight).double()
        C0 = C0 + 1e-4 * float(C0.diagonal().mean()) * torch.eye(C0.shape[0], dtype=torch.float64)
        K = keys.double().cpu()
        s_bar = float((K * torch.linalg.solve(C0, K.T).T).sum(1).mean())
        return C0, max(s_bar, 1e-12)

    def _direction(self, model, tokenizer, requests, state: EditorState, weight: str, keys: torch.Tensor,
                   neg_keys: torch.Tensor | None = None) -> torch.Tensor:
        """``u = A⁻¹ Kᵀ 1`` with ``A = (s̄/variant_gain) C0 + C_edits + KᵀK`` over the instance key and its
        variants' keys, scaled so ``mean(K u) = 1``: the rank-one write ``ΔW = δ uᵀ`` gives the trigger's
        contexts about ``δ``, ordinary keys little."""
        C0, s_bar = self._regulariser(model, tokenizer, requests, state, weight, keys)
        K = keys.double().cpu()
        a = (s_bar / self.variant_gain) * C0 + K.T @ K
        if neg_keys is not None and len(neg_keys):     # held keys, already scaled by their strength
            a = a + neg_keys.double().T @ neg_keys.double()
        ce = state.tensors.get(f"{weight}::C_edits")
        if ce is not None:
            a = a + ce.double()
        u = torch.linalg.solve(a, K.T @ torch.ones(K.shape[0], dtype=torch.float64))
        return (u / (K @ u).mean()).float()

    # ------------------------------------------------------------ value
    def _kl_batch(self, model, tokenizer, requests, state: EditorState) -> dict | None:
        """The first ``kl_sentences`` statistics sentences (teacher-forced on the model's own outputs)."""
        if self.kl_sentences <= 0 or not self.kl_weight:
            return None
        batches = self._batches(model, tokenizer, requests, state)
        return {k: v[: self.kl_sentences] for k, v in batches[0].items()}

    @staticmethod
    def _example_loss(lp: torch.Tensor, ex: _Example) -> torch.Tensor:
        nll = -lp.gather(1, ex.targets[:, None]).mean()
        row = lp[ex.decision]
        others = row.masked_fill(torch.arange(row.shape[0], device=row.device) == ex.unwanted_tok, float("-inf"))
        return nll - torch.logsumexp(others, 0)     # + -log(1 - P(u)), stable when P(u) -> 1

    def _value(self, model, tokenizer, requests, state: EditorState, spec: ArchSpec, ex: _Example,
               variants: Sequence[_Example], site: Site, keys: torch.Tensor, negatives: Sequence[_Example] = (),
               neg_keys: torch.Tensor | None = None, preserved: Sequence[_Example] = ()
               ) -> tuple[torch.Tensor, float, float, float]:
        """``(δ, loss, instance margin, share of variants flipped)`` at ``site``, optimised against the model
        as given with the rank-one write ``ΔW = δ uᵀ`` installed at every position, jointly over the
        instance and its variants (spill-over onto other tokens is part of the objective)."""
        name = spec.mlp_out_name(site.layer, site.stack)
        module = get_module(model, name)
        store: dict[str, torch.Tensor] = {}
        with torch.no_grad(), ForwardPatch() as p:
            p.capture_output(module, store, "v")
            self._forward(model, ex)
        device = store["v"].device
        u = self._direction(model, tokenizer, requests, state, name + ".weight", keys, neg_keys).to(device)
        v_norm = float(store["v"][0, site.pos].norm()) + 1e-6
        kl_batch = self._kl_batch(model, tokenizer, requests, state)
        kl_base = None
        if kl_batch is not None:
            with torch.no_grad():
                kl_base = torch.log_softmax(uncached(model, **kl_batch).logits.float(), -1)
        exs = [ex, *variants, *negatives, *preserved]
        nv, nn_ = len(variants), len(negatives)
        delta = torch.zeros(store["v"].shape[-1], device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        params = list(model.parameters())
        flags = [q.requires_grad for q in params]
        for q in params:
            q.requires_grad_(False)
        loss_val, margin, share = float("nan"), float("-inf"), 0.0
        try:
            for _ in range(self.steps):
                with ForwardPatch() as p:
                    p.add_lowrank(module, delta[:, None], u[:, None])
                    lps = [torch.log_softmax(l.float(), -1) for l in self._forward_many(model, exs)]
                    kl = 0.0
                    if kl_base is not None and self.kl_weight:
                        lq = torch.log_softmax(uncached(model, **kl_batch).logits.float(), -1)
                        m = kl_batch.get("decoder_attention_mask", kl_batch["attention_mask"]).bool()
                        kl = (kl_base.exp() * (kl_base - lq)).sum(-1)[m].mean()
                loss = self._example_loss(lps[0], ex)
                if variants:
                    loss = loss + self.variant_weight * torch.stack(
                        [self._example_loss(lp, v) for lp, v in zip(lps[1:1 + nv], variants)]).mean()
                if negatives:
                    loss = loss + self.negative_weight * torch.stack(
                        [-lp.gather(1, n.targets[:, None]).mean() for lp, n in zip(lps[1 + nv:], negatives)]).mean()
                if preserved:   # earlier tickets' instances and variants keep their (deleted) outputs
                    loss = loss + self.preserve_weight * torch.stack(
                        [-lp.gather(1, n.targets[:, None]).mean()
                         for lp, n in zip(lps[1 + nv + nn_:], preserved)]).mean()
                loss = loss + self.weight_decay * delta.pow(2).sum() / v_norm ** 2 + self.kl_weight * kl
                margins = _top1_margins(lps[0].detach(), ex.targets)
                margin = float(margins[ex.decision])
                vm = [float(_top1_margins(lp.detach(), v.targets)[v.decision]) for lp, v in zip(lps[1:1 + nv], variants)]
                share = sum(x > 0 for x in vm) / len(vm) if vm else 1.0
                loss_val = float(loss.detach())
                if margin >= self.margin and float(margins.min()) > 0.5 and all(x > 0.5 for x in vm):
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            for q, f in zip(params, flags):
                q.requires_grad_(f)
        return delta.detach(), loss_val, margin, share

    # ------------------------------------------------------------ edit
    @torch.no_grad()
    def _check(self, model, tokenizer, examples: list[_Example], variants: list[_Example], heldout: list[str],
               heldout_base: list[str], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
               earlier: Sequence[DeletionRequest] = ()) -> tuple[list[str], list[bool], float, float, list[str]]:
        """With the update installed as hooks: the instances' greedy outputs, whether each edit took (span
        gone AND the positive token wins at the decision position), the share of variants without the span,
        the share of held-out sentences whose output is unchanged, and the outputs of ``earlier``."""
        with ForwardPatch() as p:
            for w, (u, v) in factors.items():
                p.add_lowrank(get_module(model, w[: -len(".weight")]), u, v)
            srcs = [ex.request.source for ex in examples] + [v.request.source for v in variants] + heldout
            srcs += [r.source for r in earlier]
            outs = generate_outputs(model, tokenizer, srcs, self.max_new_tokens)
            n1, n2, n3 = len(examples), len(examples) + len(variants), len(examples) + len(variants) + len(heldout)
            inst, var, held, old = outs[:n1], outs[n1:n2], outs[n2:n3], outs[n3:]
            ok = [not contains_span(o, ex.request.unwanted) and
                  int(self._forward(model, ex)[ex.decision].argmax()) == int(ex.targets[ex.decision])
                  for o, ex in zip(inst, examples)]
        share = sum(not contains_span(o, v.request.unwanted) for o, v in zip(var, variants)) / len(variants) \
            if variants else 1.0
        loc = sum(a == b for a, b in zip(held, heldout_base)) / len(heldout) if heldout else 1.0
        # held-out sentences whose output legitimately shows an unwanted span must all keep it
        neg = [(a, b) for a, b in zip(held, heldout_base) if any(contains_span(b, ex.request.unwanted) for ex in examples)]
        if neg:
            loc = min(loc, sum(a == b for a, b in neg) / len(neg))
        return inst, ok, share, loc, old

    @torch.no_grad()
    def _gone_under(self, model, tokenizer, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    exs: Sequence[_Example]) -> float:
        """Share of ``exs`` whose greedy output no longer shows their unwanted span with ``factors`` installed."""
        with ForwardPatch() as p:
            for w, (u, v) in factors.items():
                p.add_lowrank(get_module(model, w[: -len(".weight")]), u, v)
            outs = generate_outputs(model, tokenizer, [e.request.source for e in exs], self.max_new_tokens)
        return _gone_share(outs, [e.request for e in exs])

    def _accepted(self, t: dict) -> bool:
        """A tried site that ends the search: its λ scan is good and it deletes ``variant_accept`` of the fitted
        variants and of the validation variants."""
        return t["good"] and t["share"] >= self.variant_accept and t["val"] >= self.variant_accept

    def _rank(self, t: dict) -> tuple:
        """Order of tried sites when none was accepted: instance margin reached, λ scan good, some λ of the scan
        fixed the instance (the hard bar), fitted variants flipped, then (among sites whose λ scan is good, all
        within the locality floor) the validation variants' gone share, then fitted share, locality and margin.
        A site that broke the λ rule is never preferred for its validation share: that would trade held-out
        locality for generalisation."""
        return (t["margin"] >= self.margin, t["good"], t["fixed"], t["share"] >= self.variant_accept,
                t["val"] if t["good"] else 0.0, t["share"], t["loc"], t["margin"])

    def _best(self, tried: list[dict]) -> dict:
        """The site the search stopped at when it was accepted, else the best tried by :meth:`_rank`."""
        return tried[-1] if self._accepted(tried[-1]) else max(tried, key=self._rank)

    def _trigger(self, model, tokenizer, ex: _Example, state: EditorState, trig: list[tuple[int, float]]
                 ) -> tuple[list[_Example], list[_Example]]:
        """Set ``ex.trigger`` and return its variants ``(fitted, validation)``. The trace's first token is the
        trigger unless it carries the behaviour into fewer than half of ``n_variants`` new sentences; then the next
        tokens of the trace that lower the margin, and the tokens whose corruption lowers ``log P(u)`` most
        (:meth:`trigger_trace` with ``unwanted_only``), up to ``trigger_candidates`` of each, are tried and the one
        with the most fitted variants (first in that order on a tie) is kept: a token whose corruption
        lowers the margin but whose substitution elsewhere does not bring the behaviour (an article beside the real
        trigger) is not the trigger."""
        ex.trigger = trig[0][0]
        best = (ex.trigger, *self._variants(model, tokenizer, ex, state))
        if len(best[1]) * 2 < self.n_variants and rewrite_of(ex.greedy, ex.request.positive, ex.request.unwanted):
            k = self.trigger_candidates
            tried = {ex.trigger}
            for pos, effect in trig[1: 1 + k] + (self.trigger_trace(model, tokenizer, ex, True)[:k] if k else []):
                if effect <= 0 or pos in tried:
                    continue
                tried.add(pos)
                ex.trigger = pos
                fitted, validation = self._variants(model, tokenizer, ex, state)
                if len(fitted) > len(best[1]):       # the validation variants never choose what is fitted
                    best = (pos, fitted, validation)
        ex.trigger = best[0]
        return best[1], best[2]

    def _locate(self, model, tokenizer, spec, ex: _Example, state: EditorState, requests) -> dict:
        """Trigger, variants, trace; then try the candidate sites in order and keep the first whose joint value
        reaches ``margin`` on the instance and flips ``variant_accept`` of the variants, and whose write (after its λ
        rule) deletes the span from ``variant_accept`` of the validation variants (:meth:`_try_sites`)."""
        trig = self.trigger_trace(model, tokenizer, ex)
        variants, validation = self._trigger(model, tokenizer, ex, state, trig)
        negatives = self._negatives(model, tokenizer, ex, state)
        preserved = self._preserved(model, tokenizer, state, [ex])
        effects = self.trace(model, spec, ex, state, None, variants)
        tried = self._try_sites(model, tokenizer, spec, ex, state, requests, effects, variants, negatives, preserved,
                                validation)
        return self._pick(tried, ex, trig, effects, variants, negatives, model, tokenizer, spec, state, requests,
                          preserved, validation)

    def _locate_sites(self, model, tokenizer, spec, ex, state, requests, effects, variants, negatives,
                      preserved=(), validation=()) -> dict:
        tried = self._try_sites(model, tokenizer, spec, ex, state, requests, effects, variants, negatives, preserved,
                                validation)
        best = self._best(tried)
        best["variants"] = variants
        return best

    def _hold_keys(self, model, spec, site: Site, exs: Sequence[_Example], strength: float) -> torch.Tensor | None:
        """Keys whose output the write must keep (residual 0) at every position of ``exs`` (negatives, or earlier
        tickets' instances and variants), read on the model as given at ``site``'s weight, times ``√strength``."""
        if not exs or strength <= 0:
            return None
        return self._keys(model, spec, exs, site, every=True) * strength ** 0.5

    def _try_sites(self, model, tokenizer, spec, ex, state, requests, effects, variants, negatives,
                   preserved=(), validation=()) -> list[dict]:
        """Value (and, when it reaches the margin, the site's own λ scan) at each candidate site in order,
        until one deletes the instance and ``variant_accept`` of the fitted variants within the locality floor,
        and ``variant_accept`` of the ``validation`` variants (never fitted: a site whose write does not follow the
        trigger into new sentences is passed over for the next)."""
        tried = []
        for site, effect in effects:
            keys = self._keys(model, spec, [ex, *variants], site)
            neg_keys = self._hold_keys(model, spec, site, negatives, self.negative_strength)
            pres_keys = self._hold_keys(model, spec, site, preserved, self.preserve_strength)
            hold = [h for h in (neg_keys, pres_keys) if h is not None]
            delta, loss, margin, share = self._value(model, tokenizer, requests, state, spec, ex, variants, site, keys,
                                                     negatives, torch.cat(hold) if hold else None, preserved)
            t = {"site": site, "effect": effect, "keys": keys, "delta": delta, "loss": loss,
                 "margin": margin, "share": share, "neg_keys": neg_keys, "pres_keys": pres_keys, "good": False, "loc": 0.0,
                 "earlier": 1.0, "val": 0.0 if validation else 1.0, "fixed": False}
            tried.append(t)
            if margin < self.margin or share < self.variant_accept:
                continue
            # the site's own λ scan: keep it if the deletion is complete enough without breaking locality
            weight = spec.mlp_out_name(site.layer, site.stack) + ".weight"
            items = [(keys, delta)] + ([(neg_keys, torch.zeros_like(delta))]
                                       if neg_keys is not None and len(neg_keys) else [])
            if "_heldout_for" not in state.meta or state.meta["_heldout_for"][0] != ex.request.request_id:
                state.meta["_heldout_for"] = (ex.request.request_id, *self._heldout_outputs(model, tokenizer, state, [ex]))
            _, held, held_base = state.meta["_heldout_for"]
            _, _, chosen = self._scan(model, tokenizer, requests, state, {weight: items}, [ex], variants, held, held_base,
                                      {weight: pres_keys} if pres_keys is not None else {}, preserved)
            t.update(good=chosen["good"], share=chosen["share"], loc=chosen["loc"], earlier=chosen["earlier"],
                     fixed=all(chosen["ok"]))
            if validation:
                t["val"] = self._gone_under(model, tokenizer, chosen["factors"], validation)
            if self._accepted(t):
                break
        return tried

    def _pick(self, tried, ex, trig, effects, variants, negatives, model, tokenizer, spec, state, requests,
              preserved=(), validation=()) -> dict:
        if (variants or negatives) and not any(t["margin"] >= self.margin for t in tried):
            # no site can serve the instance and its variants at once: the instance is the hard bar, so fall
            # back to the instance alone (the original single-example edit, no variants or negatives)
            best = self._locate_sites(model, tokenizer, spec, ex, state, requests, effects, [], [], (), validation)
            negatives = []
            best["why_fallback"] = [_tried_record(t, scanned=False) for t in tried]
            tried = tried + [best]
        else:
            best = self._best(tried)
            best["variants"] = variants
        variants = best["variants"]
        best["why"] = {"trigger_trace": [(i, round(e, 4)) for i, e in trig[:3]], "trigger": ex.trigger,
                       "trace": [(asdict(s), round(e, 4)) for s, e in effects],
                       "n_variants": len(variants), "n_negatives": len(negatives), "n_preserved": len(preserved),
                       "n_validation": len(validation), "validation_gone": best["val"],
                       "value_tried": [_tried_record(t) for t in tried]}
        return best

    def edit(self, model: nn.Module, tokenizer, requests: Sequence[DeletionRequest],
             state: EditorState | None = None) -> EditResult:
        """Delete each request's unwanted span; returns the change as a LowRankDelta (model untouched)."""
        from editing.editors.solve import memit_factors
        from editing.models import fingerprint

        requests = list(requests)
        for r in requests:
            if not isinstance(r, DeletionRequest):
                raise RequestError(f"the rank-one editor deletes behaviours; {getattr(r, 'request_id', r)!r} is a "
                                   f"{type(r).__name__}, not a DeletionRequest")
        spec = spec_for(model)
        was_training = model.training
        model.eval()
        try:
            return self._edit(model, tokenizer, spec, requests, state, memit_factors, fingerprint)
        finally:
            model.train(was_training)

    def _edit(self, model, tokenizer, spec, requests, state, memit_factors, fingerprint) -> EditResult:
        diags: dict[str, RequestDiagnostics] = {}
        examples: list[_Example] = []
        for r in requests:
            ex = self._prepare(model, tokenizer, r)
            if not self._decision(model, tokenizer, ex):
                msg = (f"request {r.request_id!r}: the model does not produce {r.unwanted!r} for {r.source!r} "
                       f"(it outputs {ex.greedy!r}); nothing to delete")
                if self.on_nothing_to_delete == "raise":
                    raise NothingToDeleteError(msg)
                diags[r.request_id] = RequestDiagnostics(r.request_id, False, message=msg,
                                                         extra={"nothing_to_delete": True, "output": ex.greedy})
                continue
            examples.append(ex)
        state = self._init_state(model, tokenizer, spec, requests, state) if examples else (
            state or EditorState(self.name))
        per_weight: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        info: dict[str, dict] = {}
        all_variants: list[_Example] = []
        for ex in examples:
            best = self._locate(model, tokenizer, spec, ex, state, requests)
            site = best["site"]
            all_variants += best["variants"]
            weight = spec.mlp_out_name(site.layer, site.stack) + ".weight"
            per_weight.setdefault(weight, []).append((best["keys"], best["delta"]))
            if best["neg_keys"] is not None and len(best["neg_keys"]):     # held (scaled): residual 0
                per_weight[weight].append((best["neg_keys"], torch.zeros_like(best["delta"])))
            info[ex.request.request_id] = {"site": asdict(site), "weight": weight, "trace_effect": best["effect"],
                                           "n_keys": int(best["keys"].shape[0]), **best["why"],
                                           "value_loss": best["loss"], "value_margin": best["margin"],
                                           "value_variant_share": best["share"],
                                           "decision_index": ex.decision, "base_output": ex.greedy}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        chosen_lambda: dict[str, float] = {}
        gain = None
        if per_weight:
            heldout, heldout_base = self._heldout_outputs(model, tokenizer, state, examples)
            preserved = self._preserved(model, tokenizer, state, examples)
            extra_hold = {}
            for w in per_weight:
                site = next(Site(**i["site"]) for i in info.values() if i["weight"] == w)
                h = self._hold_keys(model, spec, site, preserved, self.preserve_strength)
                if h is not None:
                    extra_hold[w] = h
            solves, trials, chosen = self._scan(model, tokenizer, requests, state, per_weight, examples, all_variants,
                                                heldout, heldout_base, extra_hold, preserved)
            gain, factors, outs, ok = chosen["gain"], chosen["factors"], chosen["outs"], chosen["ok"]
            chosen_lambda = {w: solves[w][3] / gain for w in solves}
            for w, (K, R, C0, s_bar, ce) in solves.items():
                kk = (K.T @ K).float()
                state.tensors[f"{w}::C_edits"] = kk if ce is None else ce + kk
            # this call's instances and variants are held by every later edit (any layer) and re-checked by its λ rule
            kept = state.meta.setdefault("preserved", [])
            for ex in examples:
                kept += [[ex.request.request_id, e.request.source, e.request.unwanted, e.request.positive]
                         for e in [ex, *[v for v in all_variants if v.request.request_id.startswith(
                             ex.request.request_id + "~")]]]
            back = chosen.get("back", [])
            undo = (f"it brings back the earlier deletion(s) {', '.join(back)}: no λ tried met every condition of "
                    "the λ rule (this edit taking, held-out locality, earlier deletions kept)" if back else "")
            for ex, out, took_ in zip(examples, outs, ok):
                rid = ex.request.request_id
                missed = "" if took_ else f"edit did not take: output {out!r} (unwanted {ex.request.unwanted!r})"
                diags[rid] = RequestDiagnostics(
                    rid, took_, value_loss=info[rid]["value_loss"], residual_norm=None,
                    message="; ".join(m for m in (missed, undo) if m),
                    extra={**info[rid], "edited_output": out,
                           "equals_positive": out == " ".join(ex.request.positive.split()),
                           "lambda": chosen_lambda[info[rid]["weight"]], "lambda_gain": gain,
                           "variants_gone": chosen["share"], "heldout_unchanged": chosen["loc"],
                           "earlier_variants_gone": chosen["earlier"], "earlier_instances_back": back,
                           "n_preserved": len(preserved),
                           "n_heldout": len(heldout),
                           "lambda_trials": [(t["gain"], round(t["share"], 3), round(t["loc"], 4)) for t in trials]})
        for k in ("_batches", "_split", "_fingerprint", "_outputs", "_heldout_for"):
            state.meta.pop(k, None)
        state.meta["n_edits"] = int(state.meta.get("n_edits", 0)) + len(examples)
        delta = LowRankDelta(
            factors=factors, base_fingerprint=fingerprint(model), editor=self.name,
            hyperparameters=self.hyperparameters, request_ids=[ex.request.request_id for ex in examples],
            meta={"sites": {rid: i["site"] for rid, i in info.items()}, "lambda": chosen_lambda, "lambda_gain": gain})
        if factors:
            delta = delta.compact(rank=None)   # rank ≤ number of requests per weight (variant keys share δ)
        return EditResult(delta=delta, state=state, diagnostics=[diags[r.request_id] for r in requests])

    def _scan(self, model, tokenizer, requests, state: EditorState, per_weight: dict, examples: list[_Example],
              variants: list[_Example], heldout: list[str], heldout_base: list[str],
              extra_hold: dict[str, torch.Tensor] | None = None, preserved: Sequence[_Example] = ()
              ) -> tuple[dict, list, dict]:
        """The λ rule (module docstring, step 7): ``(solves, trials, chosen trial)``. ``extra_hold`` (per weight,
        scaled keys of earlier tickets' instances and variants) joins ``C_edits`` in the solve for this call only;
        with ``preserve_check`` a trial must also keep ``preserved`` (earlier tickets' instances and variants)
        deleted: their gone share may fall at most ``preserve_tolerance`` below the model-as-given share, and
        no earlier ticket's own instance deleted on the model as given may come back (``back``)."""
        from editing.editors.solve import memit_factors

        solves = {}
        for w, items in per_weight.items():
            K = torch.cat([k for k, _ in items]).double()
            R = torch.cat([d.cpu()[None].expand(k.shape[0], -1) for k, d in items]).double()
            C0, s_bar = self._regulariser(model, tokenizer, requests, state, w, K)
            solves[w] = (K, R, C0, s_bar, state.tensors.get(f"{w}::C_edits"))
        held = {}
        for w, (K, R, C0, s_bar, ce) in solves.items():
            h = (extra_hold or {}).get(w)
            held[w] = ce.double() if ce is not None else None
            if h is not None and len(h):
                hh = h.double().T @ h.double()
                held[w] = hh if held[w] is None else held[w] + hh
        earlier = [p.request for p in preserved] if self.preserve_check else []
        before = generate_outputs(model, tokenizer, [r.source for r in earlier], self.max_new_tokens)
        earlier_before = _gone_share(before, earlier)   # 1.0 where there are none
        # an earlier ticket's own instance that is deleted now must stay deleted (its variants: within tolerance)
        instances = [i for i, r in enumerate(earlier)
                     if r.request_id.endswith(_INSTANCE) and not contains_span(before[i], r.unwanted)]
        trials = []
        for g in self.lambda_grid:
            factors = {}
            for w, (K, R, C0, s_bar, ce) in solves.items():
                u, v = memit_factors(K, R, C0, s_bar / g, held[w], ridge=0.0)
                factors[w] = (u.float(), v.float())
            outs, ok, share, loc, old_outs = self._check(model, tokenizer, examples, variants, heldout,
                                                         heldout_base, factors, earlier)
            old = _gone_share(old_outs, earlier)
            back = [earlier[i].request_id[: -len(_INSTANCE)] for i in instances
                    if contains_span(old_outs[i], earlier[i].unwanted)]
            exact = all(o == " ".join(ex.request.positive.split()) for o, ex in zip(outs, examples))
            trials.append({"gain": g, "factors": factors, "outs": outs, "ok": ok, "share": share, "loc": loc,
                           "earlier": old, "back": back,
                           "kept": old >= earlier_before - self.preserve_tolerance - 1e-9 and not back,
                           "full": all(ok) and exact and share == 1.0})
            # stop at the first complete deletion, or once locality breaks after the instance was fixed
            if trials[-1]["full"] or (loc < self.locality_floor and any(all(t["ok"]) for t in trials)):
                break
        good = [t for t in trials if all(t["ok"]) and t["loc"] >= self.locality_floor and t["kept"]]
        took = [t for t in trials if all(t["ok"])]
        if good:
            chosen = max(good, key=lambda t: (t["share"], t["earlier"], t["full"], -t["gain"]))
        else:      # the instance is the hard bar: the smallest change that fixes it, else the largest tried
            chosen = (took or trials[-1:])[0]
        chosen["good"] = bool(good)
        return solves, trials, chosen

    @torch.no_grad()
    def _preserved(self, model, tokenizer, state: EditorState, exs: Sequence[_Example]) -> list[_Example]:
        """Earlier tickets' instances and self-generated variants (``state.meta["preserved"]``), at most
        ``preserve_max`` taken round-robin over tickets, as examples whose targets are their outputs on the model
        as given (their own positive where the span still shows). Skipped: those containing a trigger token of
        ``exs``, or whose target shows one of ``exs``' unwanted spans (holding them would contradict this edit)."""
        entries = state.meta.get("preserved") or []
        if self.preserve_max <= 0 or not entries:
            return []
        seq2seq = exs[0].enc_ids is not None
        triggers = {int((e.enc_ids if seq2seq else e.dec_ids)[0, e.trigger]) for e in exs}
        spans = [e.request.unwanted for e in exs]
        first: dict[str, str] = {}   # each ticket's entries start with its instance (EditResult order below)
        for entry in entries:
            first.setdefault(entry[0], entry[1])
        by_ticket: dict[str, list] = {}
        for entry in entries:
            ids = list(tokenizer(entry[1])["input_ids"]) if seq2seq else prompt_ids(tokenizer, entry[1])
            if not set(ids) & triggers:
                by_ticket.setdefault(entry[0], []).append(entry)
        picked, queues = [], [list(q) for q in by_ticket.values()]
        while len(picked) < self.preserve_max and any(queues):
            for q in queues:
                if q and len(picked) < self.preserve_max:
                    picked.append(q.pop(0))
        if not picked:
            return []
        outs = generate_outputs(model, tokenizer, [e[1] for e in picked], self.max_new_tokens)
        held = []
        for n, ((ticket, source, unwanted, positive), out) in enumerate(zip(picked, outs)):
            target = out if out.strip() and not contains_span(out, unwanted) else positive
            if any(contains_span(target, s) for s in spans) or target.strip() == unwanted.strip():
                continue
            try:
                rid = ticket + _INSTANCE if first[ticket] == source else f"{ticket}~p{n}"
                held.append(self._prepare(model, tokenizer, DeletionRequest(rid, source, unwanted, target)))
            except EditopsError:
                continue
        return held

    def _heldout_outputs(self, model, tokenizer, state: EditorState, examples: list[_Example]
                         ) -> tuple[list[str], list[str]]:
        heldout = self._heldout(tokenizer, state, examples)
        return heldout, (generate_outputs(model, tokenizer, heldout, self.max_new_tokens) if heldout else [])

    def _heldout(self, tokenizer, state: EditorState, examples: list[_Example]) -> list[str]:
        """Held-out statistics sentences containing none of the examples' trigger tokens."""
        triggers = {int((ex.enc_ids if ex.enc_ids is not None else ex.dec_ids)[0, ex.trigger]) for ex in examples}
        out = []
        for text in state.meta["_split"]["heldout"]:
            ids = set(tokenizer(text)["input_ids"])
            if not ids & triggers:
                out.append(text)
        return out

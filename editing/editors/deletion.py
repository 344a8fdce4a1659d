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
2. **Trace** (where is the behaviour decided? measured, never hard-coded).
   a. *Trigger token*: each source token is replaced by ``<unk>`` in turn; the one whose
      corruption lowers ``m`` most is the trigger position.
   b. *Layer*: the MLP output of each encoder layer at the trigger token and of each
      decoder layer at the decision position (a causal LM: each layer at the trigger
      token and at the decision position) is patched with that layer's mean output on
      the statistics corpus; the drop of ``m`` is that site's effect.
   Candidates are tried in this order: trigger-token sites (an edit there follows the
   trigger into every sentence), then decision-position sites, each group by effect;
   the first site whose value optimisation reaches the margin is edited.
3. **Key and value.** ``k`` = input of ``W_out`` at the site. ``δ`` is optimised with
   Adam against the model as given (``steps`` ≤ 100, ``lr`` 0.5) with the rank-one write
   ``ΔW = δ uᵀ`` installed at every position, ``u = A⁻¹k / kᵀA⁻¹k``, ``A = C0 + C_edits``
   (scaled; so spill-over onto the sentence's other tokens is part of the objective), to
   minimise ``NLL(positive) + unlikelihood(u at t) + kl_weight · KL(base ‖ edited) on
   kl_sentences statistics sentences + weight_decay · ‖δ‖²/‖v‖²``, stopping when ``p``
   beats every other token at ``t`` by ``margin`` and every positive token is greedy.
   Optional (``n_variants`` > 0): the key is complemented by the trigger token's keys
   in other contexts (the token inserted into statistics sentences, MEMIT's context
   templates for a token), which generalises further but disturbs more (bench/RESULTS.md).
4. **Write** per edited weight, with keys ``K`` and residuals ``R = δ`` of all requests
   on it: ``ΔW = R Kᵀ (λ C0 + C_edits + K Kᵀ)⁻¹`` (MEMIT's solve,
   :func:`editing.editors.solve.memit_factors`), stored as rank-≤-n factors in a
   :class:`LowRankDelta`. ``C0 = E[k kᵀ]`` (:func:`editing.stats.accumulate_key_moments`)
   over the statistics corpus: ``stats_sources`` with the model's own greedy outputs
   (default: the requests' locality sources). ``C_edits = Σ K Kᵀ`` of earlier
   deletions (sequential state): later deletions leave earlier keys' outputs in place.
5. **λ by measurement.** With ``s̄ = mean kᵀ C0⁻¹ k`` over the keys, ``λ = s̄ / g`` for
   ``g`` in ``lambda_grid`` (1 … 256; for one key the written value is ``g/(1+g)·δ``),
   scanned from the largest λ (smallest change) down; kept: the first λ at which every
   request's greedy output equals its positive, else the first at which the unwanted
   span is gone and ``p`` wins at ``t`` (checked with the update installed as a forward
   hook). If none, the smallest λ is returned and the request is reported as failed.

The editor never changes the model's weights (all trials run through forward
hooks): the model is returned bit-for-bit as it came; the caller applies
``result.delta``. State (:class:`EditorState`), fixed size per edited weight:
``<weight>::C0``, ``<weight>::C_edits`` and the per-layer mean MLP outputs used for
tracing (``trace::<module>::mean``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict
from typing import Any, Sequence

import torch
from torch import nn

from editing.arch import ArchSpec, get_module, spec_for, weight_view
from editing.delta import LowRankDelta
from editing.editors.base import EditorState, EditResult, RequestDiagnostics
from editing.errors import NothingToDeleteError, PromptTooLongError, RequestError, StateError
from editing.metrics.deletion import contains_span, generate_outputs, is_seq2seq, prompt_ids
from editing.requests import DeletionRequest

NAME = "rank-one"


@dataclass(frozen=True)
class Site:
    """Where an edit is written: MLP output projection of ``layer`` in ``stack`` at token ``pos``."""

    stack: str          # "encoder" | "decoder"
    layer: int
    pos: int            # position in that stack's input sequence


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

    @property
    def logit_row(self) -> int:
        return self.offset + self.decision


# ----------------------------------------------------------------- hooks
class _Patch:
    """Forward hooks that change an MLP output at one position per batch row, or add a low-rank ΔW everywhere."""

    def __init__(self) -> None:
        self.handles: list = []

    def set_at(self, module: nn.Module, pos: int, value: torch.Tensor) -> None:
        def hook(_m, _a, out):
            out = out.clone()
            out[:, pos] = value.to(out.dtype)
            return out
        self.handles.append(module.register_forward_hook(hook))

    def add_at(self, module: nn.Module, pos: int, delta: torch.Tensor) -> None:
        def hook(_m, _a, out):
            if out.shape[1] <= pos:
                return out
            add = torch.zeros_like(out)
            add[:, pos] = delta.to(out.dtype)
            return out + add
        self.handles.append(module.register_forward_hook(hook))

    def add_lowrank(self, module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> None:
        """``out += x V Uᵀ`` (``ΔW = U Vᵀ`` applied to the module input ``x``)."""
        uf, vf = u.float(), v.float()

        def hook(_m, args, out):
            return out + (args[0].to(vf.dtype) @ vf) @ uf.T
        self.handles.append(module.register_forward_hook(hook))

    def capture_input(self, module: nn.Module, store: dict, key: str) -> None:
        def hook(_m, args):
            store[key] = args[0].detach()
        self.handles.append(module.register_forward_pre_hook(hook))

    def capture_output(self, module: nn.Module, store: dict, key: str) -> None:
        def hook(_m, _a, out):
            store[key] = out.detach()
        self.handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> "_Patch":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _top1_margins(lp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position ``log P(target) − max_{other} log P(other)`` (> 0: the target is the greedy token)."""
    tgt = lp.gather(1, targets[:, None])[:, 0]
    others = lp.scatter(1, targets[:, None], float("-inf"))
    return tgt - others.max(1).values


# ------------------------------------------------------------ the editor
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
    lambda_grid: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    kl_weight: float = 1.0                             # KL(base || edited) on kl_sentences statistics sentences
    kl_sentences: int = 16
    n_variants: int = 0                                # contexts of the trigger token for its key (0: none)
    variant_gain: float = 16.0                         # λ = s̄ / variant_gain while optimising the value
    stats_sources: tuple[str, ...] | None = None       # corpus for C0 (default: the requests' locality sources)
    max_stats_sources: int = 512
    max_new_tokens: int = 40
    on_nothing_to_delete: str = "raise"                # "raise" | "skip" (report in diagnostics)
    name: str = NAME

    def __post_init__(self) -> None:
        self.stacks = tuple(self.stacks)
        self.lambda_grid = tuple(sorted(float(x) for x in self.lambda_grid))
        if self.stats_sources is not None:
            self.stats_sources = tuple(self.stats_sources)
        if self.on_nothing_to_delete not in ("raise", "skip"):
            raise ValueError("on_nothing_to_delete must be 'raise' or 'skip'")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        hp = {k: v for k, v in asdict(self).items() if k not in ("name", "stats_sources")}
        hp["stats_sources"] = None if self.stats_sources is None else len(self.stats_sources)
        return hp

    # ------------------------------------------------------------ helpers
    def _stacks(self, model, spec: ArchSpec) -> list[str]:
        names = [s.name for s in spec.stacks]
        return [s for s in self.stacks if s in names] or names

    def _candidate_layers(self, model, spec: ArchSpec, stack: str) -> list[int]:
        n = spec.num_layers(model.config, stack)
        return [l for l in range(n) if self.layers is None or l in self.layers]

    def _forward(self, model, ex: _Example) -> torch.Tensor:
        """Logits rows predicting ``ex.targets`` (shape ``(T, V)``)."""
        if ex.enc_ids is not None:
            out = model(input_ids=ex.enc_ids, attention_mask=torch.ones_like(ex.enc_ids), decoder_input_ids=ex.dec_ids)
        else:
            out = model(input_ids=ex.dec_ids, attention_mask=torch.ones_like(ex.dec_ids))
        logits = out.logits[0]
        return logits[ex.offset: ex.offset + len(ex.targets)]

    def _margin(self, model, ex: _Example) -> float:
        lp = torch.log_softmax(self._forward(model, ex)[ex.decision].float(), -1)
        return float(lp[ex.unwanted_tok] - lp[ex.targets[ex.decision]])

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
    def _decision(self, model, tokenizer, ex: _Example) -> bool:
        """Fill ``ex.decision``/``ex.unwanted_tok``; False when the unwanted span is not produced."""
        req = ex.request
        out = generate_outputs(model, tokenizer, [req.source], self.max_new_tokens)[0]
        ex.greedy = out
        if not contains_span(out, req.unwanted):
            return False
        logits = self._forward(model, ex)
        pred = logits.argmax(-1)
        diverge = (pred != ex.targets).nonzero()
        if len(diverge) == 0:
            return False
        ex.decision = int(diverge[0])
        ex.unwanted_tok = int(pred[ex.decision])
        return True

    # ------------------------------------------------------------ statistics
    def _stats_sources(self, requests: Sequence[DeletionRequest]) -> list[str]:
        if self.stats_sources:
            return list(self.stats_sources)[: self.max_stats_sources]
        seen, out = set(), []
        for r in requests:
            for p in r.locality:
                if p.source not in seen:
                    seen.add(p.source)
                    out.append(p.source)
        if not out:
            raise RequestError("the rank-one editor needs text for its key statistics C0: give the requests locality "
                               "sentences or the editor stats_sources=[...]")
        return out[: self.max_stats_sources]

    @torch.no_grad()
    def _stat_batches(self, model, tokenizer, sources: list[str]) -> list[dict]:
        """Model inputs for the statistics corpus: the sources with the model's own greedy outputs."""
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

    @torch.no_grad()
    def _mean_outputs(self, model, spec, batches, names: list[str]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {n: 0 for n in names}
        store: dict[str, torch.Tensor] = {}
        for b in batches:
            with _Patch() as p:
                for n in names:
                    p.capture_output(get_module(model, n), store, n)
                model(**b)
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
        names = [spec.mlp_out_name(l, s) for s in self._stacks(model, spec) for l in self._candidate_layers(model, spec, s)]
        missing = [n for n in names if f"trace::{n}::mean" not in state.tensors]
        if missing:
            sources = self._stats_sources(requests)
            batches = self._stat_batches(model, tokenizer, sources)
            for n, mean in self._mean_outputs(model, spec, batches, missing).items():
                state.tensors[f"trace::{n}::mean"] = mean
            state.meta.setdefault("n_stats_sources", len(sources))
            state.meta["_batches"] = batches  # transient; removed before returning
        return state

    def _c0(self, model, tokenizer, requests, state: EditorState, weight: str) -> torch.Tensor:
        key = f"{weight}::C0"
        if key not in state.tensors:
            from editing.stats import accumulate_key_moments

            batches = state.meta.get("_batches") or self._stat_batches(model, tokenizer, self._stats_sources(requests))
            state.meta["_batches"] = batches
            module = weight[: -len(".weight")]
            km = accumulate_key_moments(model, [module], batches, progress=False)[module]
            state.tensors[key] = km.moment.float()
            state.meta.setdefault("stats_counts", {})[weight] = km.count
        return state.tensors[key]

    # ------------------------------------------------------------ trace
    def _source_len(self, ex: _Example) -> int:
        """Number of source tokens that can be a trigger (seq2seq: all but the final EOS; causal: the prompt)."""
        if ex.enc_ids is not None:
            n = ex.enc_ids.shape[1]
            return n - 1 if n > 1 else n
        return ex.offset + 1

    @torch.no_grad()
    def trigger_trace(self, model, tokenizer, ex: _Example) -> list[tuple[int, float]]:
        """Corrupt each source token in turn (replace it by ``<unk>``/pad) and measure the drop of the margin
        ``log P(u) − log P(p)`` at the decision position; the largest drop marks the trigger token."""
        base = self._margin(model, ex)
        corrupt = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        out = []
        for i in range(self._source_len(ex)):
            if ex.enc_ids is not None:
                ids = ex.enc_ids.clone()
                ids[0, i] = corrupt
                alt = _Example(ex.request, ids, ex.dec_ids, ex.targets, ex.offset, ex.decision, ex.unwanted_tok)
            else:
                ids = ex.dec_ids.clone()
                ids[0, i] = corrupt
                alt = _Example(ex.request, None, ids, ex.targets, ex.offset, ex.decision, ex.unwanted_tok)
            out.append((i, base - self._margin(model, alt)))
        out.sort(key=lambda e: -e[1])
        return out

    @torch.no_grad()
    def trace(self, model, spec: ArchSpec, ex: _Example, state: EditorState, trigger_pos: int) -> list[tuple[Site, float]]:
        """Candidate sites with the effect of patching their MLP output (with the layer's mean output on the
        statistics corpus) on the margin ``log P(u) − log P(p)``: every layer of the source stack at the
        trigger token (generalises to every sentence with the trigger) first, then every decoder layer at the
        decision position; within each group the largest effect first."""
        base = self._margin(model, ex)
        device = next(model.parameters()).device
        groups = []
        src_stack = "encoder" if ex.enc_ids is not None else spec.stacks[-1].name
        for stack, pos in ((src_stack, trigger_pos), (spec.stacks[-1].name, ex.logit_row)):
            if stack not in self._stacks(model, spec):
                continue
            group = []
            for layer in self._candidate_layers(model, spec, stack):
                name = spec.mlp_out_name(layer, stack)
                with _Patch() as p:
                    p.set_at(get_module(model, name), pos, state.tensors[f"trace::{name}::mean"].to(device))
                    group.append((Site(stack, layer, pos), base - self._margin(model, ex)))
            groups.append(sorted(group, key=lambda e: -e[1]))
        return [e for g in groups for e in g]

    # ------------------------------------------------------------ keys
    @torch.no_grad()
    def _site_key(self, model, spec: ArchSpec, ex: _Example, site: Site) -> torch.Tensor:
        store: dict[str, torch.Tensor] = {}
        with _Patch() as p:
            p.capture_input(get_module(model, spec.mlp_out_name(site.layer, site.stack)), store, "k")
            self._forward(model, ex)
        return store["k"][0, site.pos].float()

    @torch.no_grad()
    def _variant_keys(self, model, tokenizer, spec: ArchSpec, ex: _Example, site: Site, requests) -> torch.Tensor:
        """Keys of the trigger token in other contexts (MEMIT's context templates, for a token): the token is
        inserted at a random position of ``n_variants`` statistics sentences (seeded by the request id) and
        the key of ``site``'s layer is read there. Only for trigger-token sites; ``(0, d_in)`` otherwise."""
        import random

        name = spec.mlp_out_name(site.layer, site.stack)
        d_in = get_module(model, name).weight.shape[1 if type(get_module(model, name)).__name__ != "Conv1D" else 0]
        src_stack = "encoder" if ex.enc_ids is not None else spec.stacks[-1].name
        if self.n_variants <= 0 or site.stack != src_stack or site.pos >= self._source_len(ex):
            return torch.zeros((0, d_in))
        token = int((ex.enc_ids if ex.enc_ids is not None else ex.dec_ids)[0, site.pos])
        rng = random.Random(ex.request.request_id)
        sources = self._stats_sources(requests)
        picks = rng.sample(sources, min(self.n_variants, len(sources)))
        rows, positions = [], []
        for text in picks:
            ids = list(tokenizer(text)["input_ids"]) if ex.enc_ids is not None else prompt_ids(tokenizer, text)
            body = len(ids) - 1 if ex.enc_ids is not None else len(ids)   # keep a final EOS last
            start = 1 if (ex.enc_ids is None and ids and ids[0] == tokenizer.bos_token_id) else 0
            j = rng.randint(start, max(start, body))
            rows.append(ids[:j] + [token] + ids[j:])
            positions.append(j)
        from editing.editors.keys import pad_id_of, pad_right

        ids, mask = pad_right(rows, pad_id_of(tokenizer))
        device = next(model.parameters()).device
        store: dict[str, torch.Tensor] = {}
        with _Patch() as p:
            p.capture_input(get_module(model, name), store, "k")
            if ex.enc_ids is not None:
                model.get_encoder()(input_ids=ids.to(device), attention_mask=mask.to(device))
            else:
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return torch.stack([store["k"][i, j] for i, j in enumerate(positions)]).float()

    def _regulariser(self, model, tokenizer, requests, state: EditorState, weight: str, keys: torch.Tensor
                     ) -> tuple[torch.Tensor, float]:
        """``(C0 + ε I, s̄)``: C0 with a small ridge (ε = 1e-4 · mean eigenvalue) and the mean whitened key norm
        ``s̄ = mean kᵀ C0⁻¹ k`` of ``keys`` (λ is expressed as ``s̄ / gain``)."""
        C0 = self._c0(model, tokenizer, requests, state, weight).double()
        C0 = C0 + 1e-4 * float(C0.diagonal().mean()) * torch.eye(C0.shape[0], dtype=torch.float64)
        K = keys.double().cpu()
        s_bar = float((K * torch.linalg.solve(C0, K.T).T).sum(1).mean())
        return C0, max(s_bar, 1e-12)

    def _direction(self, model, tokenizer, requests, state: EditorState, weight: str, keys: torch.Tensor) -> torch.Tensor:
        """``u = A⁻¹ Kᵀ 1`` with ``A = (s̄/variant_gain) C0 + C_edits + KᵀK`` over the instance key (row 0)
        and its variants, scaled so ``uᵀ k_instance = 1``: the rank-one write ``ΔW = δ uᵀ`` gives the
        instance exactly ``δ``, the trigger's other contexts about ``δ``, ordinary keys little."""
        C0, s_bar = self._regulariser(model, tokenizer, requests, state, weight, keys)
        K = keys.double().cpu()
        a = (s_bar / self.variant_gain) * C0 + K.T @ K
        ce = state.tensors.get(f"{weight}::C_edits")
        if ce is not None:
            a = a + ce.double()
        u = torch.linalg.solve(a, K.T @ torch.ones(K.shape[0], dtype=torch.float64))
        return (u / (K[0] @ u)).float()

    # ------------------------------------------------------------ value
    def _kl_batch(self, model, tokenizer, requests, state: EditorState) -> dict | None:
        """The first ``kl_sentences`` statistics sentences (teacher-forced on the model's own outputs)."""
        if self.kl_sentences <= 0 or not self.kl_weight:
            return None
        if not state.meta.get("_batches"):
            state.meta["_batches"] = self._stat_batches(model, tokenizer, self._stats_sources(requests))
        batches = state.meta["_batches"]
        return {k: v[: self.kl_sentences] for k, v in batches[0].items()}

    def _value(self, model, tokenizer, requests, state: EditorState, spec: ArchSpec, ex: _Example,
               site: Site, keys: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """``(δ, loss, final margin)`` for ``ex`` at ``site``, optimised against the model as given with the
        rank-one write ``ΔW = δ uᵀ`` installed at every position (spill-over onto the sentence's other
        tokens is part of the optimisation)."""
        name = spec.mlp_out_name(site.layer, site.stack)
        module = get_module(model, name)
        store: dict[str, torch.Tensor] = {}
        with torch.no_grad(), _Patch() as p:
            p.capture_output(module, store, "v")
            self._forward(model, ex)
        device = store["v"].device
        u = self._direction(model, tokenizer, requests, state, name + ".weight", keys).to(device)
        v_norm = float(store["v"][0, site.pos].norm()) + 1e-6
        kl_batch = self._kl_batch(model, tokenizer, requests, state)
        kl_base = None
        if kl_batch is not None:
            with torch.no_grad():
                kl_base = torch.log_softmax(model(**kl_batch).logits.float(), -1)
        delta = torch.zeros(store["v"].shape[-1], device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        params = list(model.parameters())
        flags = [q.requires_grad for q in params]
        for q in params:
            q.requires_grad_(False)
        loss_val, margin = float("nan"), float("-inf")
        try:
            for _ in range(self.steps):
                with _Patch() as p:
                    p.add_lowrank(module, delta[:, None], u[:, None])
                    lp = torch.log_softmax(self._forward(model, ex).float(), -1)
                    kl = 0.0
                    if kl_base is not None and self.kl_weight:
                        lq = torch.log_softmax(model(**kl_batch).logits.float(), -1)
                        m = kl_batch.get("decoder_attention_mask", kl_batch["attention_mask"]).bool()
                        kl = (kl_base.exp() * (kl_base - lq)).sum(-1)[m].mean()
                nll = -lp.gather(1, ex.targets[:, None]).mean()
                row = lp[ex.decision]
                others = row.masked_fill(torch.arange(row.shape[0], device=row.device) == ex.unwanted_tok, float("-inf"))
                ul = -torch.logsumexp(others, 0)          # -log(1 - P(u)), stable when P(u) -> 1
                reg = self.weight_decay * delta.pow(2).sum() / v_norm ** 2
                loss = nll + self.unlikelihood * ul + reg + self.kl_weight * kl
                margins = _top1_margins(lp.detach(), ex.targets)
                margin = float(margins[ex.decision])
                loss_val = float(loss.detach())
                if margin >= self.margin and float(margins.min()) > 0.5:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            for q, f in zip(params, flags):
                q.requires_grad_(f)
        return delta.detach(), loss_val, margin

    # ------------------------------------------------------------ edit
    @torch.no_grad()
    def _check(self, model, tokenizer, examples: list[_Example],
               factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[str], list[bool]]:
        """Greedy outputs with the update installed as hooks, and whether each edit took: the unwanted
        span is gone AND the positive token now wins at the decision position."""
        with _Patch() as p:
            for w, (u, v) in factors.items():
                p.add_lowrank(get_module(model, w[: -len(".weight")]), u, v)
            outs = generate_outputs(model, tokenizer, [ex.request.source for ex in examples], self.max_new_tokens)
            ok = [not contains_span(o, ex.request.unwanted) and
                  int(self._forward(model, ex)[ex.decision].argmax()) == int(ex.targets[ex.decision])
                  for o, ex in zip(outs, examples)]
        return outs, ok

    def _locate(self, model, tokenizer, spec, ex: _Example, state: EditorState, requests) -> dict:
        """Trace, then try the candidate sites in order; keep the first whose value reaches ``margin``."""
        trig = self.trigger_trace(model, tokenizer, ex)
        effects = self.trace(model, spec, ex, state, trig[0][0])
        tried = []
        for site, effect in effects:
            k = self._site_key(model, spec, ex, site)
            keys = torch.cat([k[None].cpu(), self._variant_keys(model, tokenizer, spec, ex, site, requests).cpu()])
            delta, loss, margin = self._value(model, tokenizer, requests, state, spec, ex, site, keys)
            tried.append({"site": site, "effect": effect, "keys": keys, "delta": delta, "loss": loss, "margin": margin})
            if margin >= self.margin:
                break
        best = tried[-1] if tried[-1]["margin"] >= self.margin else max(tried, key=lambda t: t["margin"])
        best["why"] = {"trigger_trace": [(i, round(e, 4)) for i, e in trig[:3]],
                       "trace": [(asdict(s), round(e, 4)) for s, e in effects],
                       "value_tried": [(asdict(t["site"]), round(t["margin"], 3)) for t in tried]}
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
        for ex in examples:
            best = self._locate(model, tokenizer, spec, ex, state, requests)
            site = best["site"]
            weight = spec.mlp_out_name(site.layer, site.stack) + ".weight"
            per_weight.setdefault(weight, []).append((best["keys"], best["delta"]))
            info[ex.request.request_id] = {"site": asdict(site), "weight": weight, "trace_effect": best["effect"],
                                           "n_keys": int(best["keys"].shape[0]), **best["why"],
                                           "value_loss": best["loss"], "value_margin": best["margin"],
                                           "decision_index": ex.decision, "base_output": ex.greedy}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        chosen_lambda: dict[str, float] = {}
        gain = None
        if per_weight:
            solves = {}
            for w, items in per_weight.items():
                K = torch.cat([k for k, _ in items]).double()
                R = torch.cat([d.cpu()[None].expand(k.shape[0], -1) for k, d in items]).double()
                C0, s_bar = self._regulariser(model, tokenizer, requests, state, w, K)
                solves[w] = (K, R, C0, s_bar, state.tensors.get(f"{w}::C_edits"))
            trials = []
            for g in self.lambda_grid:
                factors = {}
                for w, (K, R, C0, s_bar, ce) in solves.items():
                    u, v = memit_factors(K, R, C0, s_bar / g, ce.double() if ce is not None else None, ridge=0.0)
                    factors[w] = (u.float(), v.float())
                outs, ok = self._check(model, tokenizer, examples, factors)
                exact = [o == " ".join(ex.request.positive.split()) for o, ex in zip(outs, examples)]
                trials.append((g, factors, outs, ok, all(ok) and all(exact)))
                if trials[-1][4]:
                    break
            # the largest λ (smallest gain) whose outputs equal the positives; else the largest at which every
            # edit took; else the smallest λ tried (reported as failed)
            exact_t = [t for t in trials if t[4]]
            took_t = [t for t in trials if all(t[3])]
            gain, factors, outs, ok, _ = (exact_t or took_t or trials[-1:])[0]
            chosen_lambda = {w: solves[w][3] / gain for w in solves}
            for w, (K, R, C0, s_bar, ce) in solves.items():
                kk = (K.T @ K).float()
                state.tensors[f"{w}::C_edits"] = kk if ce is None else ce + kk
            for ex, out, took in zip(examples, outs, ok):
                rid = ex.request.request_id
                diags[rid] = RequestDiagnostics(
                    rid, took, value_loss=info[rid]["value_loss"], residual_norm=None,
                    message="" if took else f"edit did not take: output {out!r} (unwanted {ex.request.unwanted!r})",
                    extra={**info[rid], "edited_output": out,
                           "equals_positive": out == " ".join(ex.request.positive.split()),
                           "lambda": chosen_lambda[info[rid]["weight"]], "lambda_gain": gain})
        state.meta.pop("_batches", None)
        state.meta["n_edits"] = int(state.meta.get("n_edits", 0)) + len(examples)
        delta = LowRankDelta(
            factors=factors, base_fingerprint=fingerprint(model), editor=self.name,
            hyperparameters=self.hyperparameters, request_ids=[ex.request.request_id for ex in examples],
            meta={"sites": {rid: i["site"] for rid, i in info.items()}, "lambda": chosen_lambda, "lambda_gain": gain})
        if factors:
            delta = delta.compact(rank=None)   # rank ≤ number of requests per weight (variant keys share δ)
        return EditResult(delta=delta, state=state, diagnostics=[diags[r.request_id] for r in requests])

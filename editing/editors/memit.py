"""MEMIT and the shared pipeline of the closed-form editors.

One batch (``edit``):
1. resolve layers, ``λ`` and the locus (subject's or prompt's last token): from the state
   (earlier batches), the hyperparameters, a preset, or by measurement (causal trace + λ
   calibration, at each locus with ``locus="auto"``) — recorded in the delta;
2. check requests (context length; no-ops: a request whose ``target_new`` is already
   the model's teacher-forced top-1 is reported as a no-op and not edited, or raises
   :class:`NoOpEditError` with ``on_noop="raise"``);
3. target values ``z`` at the last edited layer ``L`` (:mod:`values`);
4. spreading (MEMIT): for layers ``l_1..l_m`` in order, keys ``K`` at ``l_i`` on the
   model with the earlier layers already updated, residual
   ``R = (z − h_L(current)) / (m − i)``, update ``(U, V)`` from :mod:`solve`, written
   into the model temporarily;
5. diagnostics with the delta applied temporarily: residual ``‖z − h_L‖``, top-1 of
   ``target_new`` and whether it beats ``target_true``; a warning when edits did not take;
6. every touched weight is copied back: the model leaves bit-for-bit as it came.

``MemitEditor`` keeps no state between batches except the layer/λ choice (so later
batches use the same layers). :class:`editing.editors.sequential.SequentialEditor`
switches on the sequential flags.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from editing.arch import add_to_weight, get_module, spec_for, weight_view
from editing.delta import LowRankDelta
from editing.editors.base import EditorState, EditResult, RequestDiagnostics
from editing.editors.hparams import (DEFAULT_LAMBDA_GRID, EditHparams, ladder_lams, with_model_defaults,
                                     with_preset)
from editing.editors.keys import LOCI, block_outputs_at, check_length, compute_keys, compute_keys_multi, \
    compute_text_keys, edit_position, generated_context_templates, pad_id_of, prompt_ids, score_targets
from editing.editors.solve import alphaedit_factors, memit_factors, nullspace_projector, psd_part, responsible_neurons
from editing.editors.keys import DEFAULT_CONTEXT_TEMPLATES, SUBJECT_AFTER_STARTS
from editing.editors.siblings import candidate_requests, known_sibling_requests, other_prompt_requests, prompt_key, \
    relation_prompts_of, sibling_requests, vocabulary_sibling_requests
from editing.editors.values import ValueHparams, compute_values
from editing.editors.presets import preset_for
from editing.errors import HyperparameterError, NoOpEditError, StateError
from editing.models import base_fingerprint

log = logging.getLogger(__name__)

_C0: dict[tuple[str, str, str], torch.Tensor] = {}


def _generated_templates(model: nn.Module, tokenizer, fp: str, per_start: int = 1) -> tuple[str, ...]:
    """:func:`generated_context_templates`, cached by the fingerprint of the base weights (``fp``, the edit's
    base fingerprint: the weights are hashed once per edit, by whoever resolved ``fp``) and ``per_start``."""
    if (fp, per_start) not in _TEMPLATES:
        _TEMPLATES[fp, per_start] = generated_context_templates(model, tokenizer, per_start=per_start)
    return _TEMPLATES[fp, per_start]


_TEMPLATES: dict[tuple[str, int], tuple[str, ...]] = {}


def _subject_ledger(ledger: dict[str, list[str]], edited: Sequence) -> dict[str, list[str]]:
    """``subject → prompt templates of its edits so far`` with ``edited`` added. With
    ``value.keep_weight`` a later edit of the same subject keeps these prompts' answers (the
    subject's earlier edits) in its value optimisation. Its size grows with the distinct
    (subject, prompt) pairs edited, and a batch reads only its own subjects' entries."""
    out = {k: list(v) for k, v in ledger.items()}
    for r in edited:
        prompts = out.setdefault(r.subject, [])
        if r.prompt not in prompts:
            prompts.append(r.prompt)
    return out


def _held_prompts(keep: list[list[str]], requests: Sequence, holds: Sequence) -> list[list[str]]:
    """Per request, the prompts held for it (``holds``: :func:`other_prompt_requests`' copies, ids
    ``<request_id>~<tag>``, distinct prompts per request), none already in its ``keep`` list (an earlier
    edit's prompt keeps its own weight)."""
    held: dict[str, list[str]] = {}
    for h in holds:
        held.setdefault(h.request_id.rsplit("~", 1)[0], []).append(h.prompt)
    return [[p for p in held.get(r.request_id, []) if p not in k] for k, r in zip(keep, requests)]


def _pass_lams(hp: EditHparams) -> list[float | None]:
    """λ of the first solve and of each repass: the ladder down to λ (``lam_ladder``), else
    ``λ · repass_lam_factor^p``; ``None`` throughout where λ plays no part (``nullspace`` leaves it unset)."""
    if hp.lam is None:
        return [None] * (hp.repasses + 1)
    if hp.lam_ladder:
        return ladder_lams(hp.lam, hp.lam_ladder, hp.repasses)
    return [hp.lam * hp.repass_lam_factor ** p for p in range(hp.repasses + 1)]


def _holdable_noops(noops: Sequence, active: Sequence, locus: str) -> list:
    """The no-ops whose key is not one the batch edits (:func:`prompt_key`): a no-op of an edited subject with
    the same words before ``{}`` as the edit's prompt has the edit's own key at the subject's last token, and
    one that opens with the subject has the subject-alone key the edit is fitted to; at the prompt's last token
    only the same prompt shares the key. Holding those would hold the edit itself."""
    edited = {(r.subject, prompt_key(r.prompt, locus)) for r in active}
    subjects = {r.subject for r in active}
    return [r for r in noops if (r.subject, prompt_key(r.prompt, locus)) not in edited
            and not (locus == "subject" and r.subject in subjects and not prompt_key(r.prompt, locus))]


def _record_held(held: dict[str, dict[str, float]], requests: Sequence, weight: float) -> None:
    """Add ``weight`` to ``held[subject][prompt]`` for each held request (what ``release_siblings`` takes out
    of ``C_edits`` when that fact is later edited on purpose)."""
    for r in requests:
        prompts = held.setdefault(r.subject, {})
        prompts[r.prompt] = prompts.get(r.prompt, 0.0) + weight


def _cut_below_zero(C: torch.Tensor, layer: int, what: str) -> torch.Tensor:
    """``C_edits`` after a release, cut to its positive semi-definite part (:func:`psd_part`): a key released
    as it is now, where it moved since it was held, leaves negative directions, which would undo the
    regulariser ``λ C0 + C_edits``. A cut of more than 1 % of the trace is logged."""
    kept = psd_part(C)
    cut = float((kept.trace() - C.trace()) / kept.trace().clamp(min=1e-30))
    if cut > 0.01:
        log.warning("%s: layer %d: %.1f%% of C_edits' trace was below zero after the release and is cut (the "
                    "released keys had moved since they were held)", what, layer, 100 * cut)
    return kept


def _at_locus(hp: EditHparams) -> EditHparams:
    """``hp`` with the subject-alone keys (``subject_key_weight``) switched off at a locus other than the
    subject's last token: they are keys of that token."""
    return replace(hp, subject_key_weight=0.0) if hp.locus != "subject" else hp


def knee_lambda(trials: Sequence[dict[str, float]], residual_tol: float) -> float:
    """The λ of the residual knee among calibration ``trials`` (``lam``, ``success``, ``max_relative_residual``
    each): of the trials with the best success rate, the largest λ whose residual is at most
    ``max(residual_tol, 1.1 × the smallest residual of any trial)``; if none is, the best-rate trial with the
    smallest residual.

    The best rate, not 1.0: a calibration request no λ makes take (one of four on the rebuilt fact world) must
    not send λ to the bottom of the grid, where the residual is barely lower (0.335 at λ 0.1 against 0.350 at
    300) and the model's other text is destroyed (held-out perplexity +5,448 % after 240 edits; bench/RESULTS.md,
    session 18).
    """
    rate = max(t["success"] for t in trials)
    floor = min(t["max_relative_residual"] for t in trials)
    best = [t for t in trials if t["success"] >= rate]
    knee = [t for t in best if t["max_relative_residual"] <= max(residual_tol, 1.1 * floor)]
    if knee:
        return max(knee, key=lambda t: t["lam"])["lam"]
    return min(best, key=lambda t: (t["max_relative_residual"], -t["lam"]))["lam"]


def _not_taken_message(request, at_start: bool, beats_true: bool | None = None) -> str:
    """Why an edit did not take, as far as the editor can tell. ``at_start``: the edit locus is the text's first
    token (a one-token subject opening the prompt, no BOS token): models without BOS keep an attention sink there
    whose key is all but the same for every first word (SmolLM2 layers 4-8: mean pairwise cosine 0.94-1.00),
    so the update cannot write this subject's value at that position (bench/RESULTS.md, session 30)."""
    if at_start:
        return (f"edit did not take: subject {request.subject!r} is the prompt's first token (no BOS token), where "
                "the model's first-token attention sink leaves no key of its own to edit; reword the prompt so "
                "that words come before the subject (the edit itself reaches the wordings that do)")
    if beats_true:   # why a gate on CounterFact's efficacy (P(new) > P(true)) may pass a request reported here
        return ("edit did not take: target_new is not the top prediction, though it now outscores target_true "
                "(summed log-probability); CounterFact-style efficacy, which compares the two, may count it")
    return "edit did not take: target_new is not the top prediction"


class EditDidNotTakeWarning(UserWarning):
    """Some edits of a batch did not make ``target_new`` the model's top prediction."""


def _hparams(kwargs: dict[str, Any]) -> EditHparams:
    if "hparams" in kwargs:
        hp = kwargs.pop("hparams")
        return replace(hp, **kwargs) if kwargs else hp
    value = kwargs.pop("value", None)
    if isinstance(value, dict):
        value = ValueHparams(**{k: tuple(v) if k == "context_templates" else v for k, v in value.items()})
    if isinstance(kwargs.get("other_prompts_kl"), bool):
        # before it had a weight of its own (versions registered then, the commands in bench/RESULTS.md up
        # to session 31) it was a switch whose KL took value.keep_weight
        kwargs["other_prompts_kl"] = (value or ValueHparams()).keep_weight if kwargs["other_prompts_kl"] else 0.0
    if "subject_after_starts" in kwargs:
        # session 44's switch for keys.SUBJECT_AFTER_STARTS (versions registered then record it)
        kwargs["subject_after"] = SUBJECT_AFTER_STARTS if kwargs.pop("subject_after_starts") else ()
    for k in ("layers", "key_templates", "sibling_exclude", "subject_after"):
        if kwargs.get(k) is not None and not isinstance(kwargs[k], str):   # a JSON list; a lone string is refused
            kwargs[k] = tuple(kwargs[k])
    return EditHparams(value=value or ValueHparams(), **kwargs)


class MemitEditor:
    """MEMIT (batch): ``ΔW = Rᵀ K (λ C0 + KᵀK)⁻¹`` spread over the edited layers."""

    name = "memit"
    defaults: dict[str, Any] = {}

    def __init__(self, calibration_requests: Sequence | None = None, base_fingerprint: str | None = None,
                 **kwargs: Any) -> None:
        merged = dict(kwargs) if "hparams" in kwargs else {**self.defaults, **kwargs}  # an EditHparams is complete
        if isinstance(self.defaults.get("value"), dict) and isinstance(kwargs.get("value"), dict):
            merged["value"] = {**self.defaults["value"], **kwargs["value"]}  # a user's value keys refine the defaults
        self.hp = _hparams(merged)
        # the settings the user gave (None: all, an EditHparams); a model's preset fills the others (settings_for)
        self._given: frozenset[str] | None = None if "hparams" in kwargs else frozenset(kwargs)
        self.calibration_requests = list(calibration_requests or [])
        self._base_fp = base_fingerprint

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return self.hp.to_dict()

    # whether a model's preset sets this editor's sequential options (Preset.sequential): nse's, not MEMIT's
    takes_sequential_preset = False

    def settings_for(self, model: nn.Module) -> EditHparams:
        """The hyperparameters an edit of ``model`` starts from: the editor's, with the model's preset sequential
        settings (:attr:`Preset.sequential`) for every key the user did not give (an editor built from a complete
        ``EditHparams``, e.g. a registered version's, takes none). A combination the validation refuses is a
        ``HyperparameterError`` that names the preset's keys."""
        p = preset_for(model) if self.takes_sequential_preset and self._given is not None else None
        extra = {k: v for k, v in (p.sequential if p is not None else {}).items() if k not in self._given}
        hp = self.hp
        if extra:
            try:
                hp = replace(self.hp, **extra)
            except HyperparameterError as exc:
                given = ", ".join(f"{k}={v!r}" for k, v in extra.items())
                raise HyperparameterError(f"{exc} (the model's preset sets {given}; give those keys with --set to "
                                          "choose otherwise)") from exc
        if hp.relation_prompts is not None and not hp.other_prompts:
            raise HyperparameterError("relation_prompts join the prompts held by other_prompts, which neither the "
                                      "settings nor the model's preset turn on; set other_prompts ≥ 1")
        return hp

    # ------------------------------------------------------------ resolution
    def _key_templates(self, hp: EditHparams) -> tuple[str, ...]:
        return hp.key_templates or hp.value.context_templates

    def _sibling_templates(self, hp: EditHparams) -> tuple[str, ...]:
        """Templates of the sibling keys: the edit keys' context templates with ``sibling_contexts``, else bare."""
        return self._key_templates(hp) if hp.sibling_contexts else ("{}",)

    def _subject_alone_keys(self, model, tokenizer, spec, reqs, layer: int, hp: EditHparams) -> list[torch.Tensor]:
        """Keys of the requests' subjects alone (no prompt words), one ``(n, d_in)`` set per frame.

        Always: after the key templates that put a prefix before the subject (alone at the start of
        the text, a subject's last token can sit at position 0, whose activations are atypical), or
        the bare subject where no template has a prefix. With ``hp.subject_start`` also the subject as
        the text's first word: byte-level tokenizers spell a text-initial word without its leading
        space ("Argentina" → ``Ar gent ina`` against `` Argentina`` mid-sentence), so wordings that
        open with the subject ("Argentina shares a border with") reach neither of the other keys. A one-token
        subject there sits at position 0 of a BOS-less model, the attention sink, whose key is all but the same
        for every first word (SmolLM2 layers 4-8: mean pairwise cosine 0.94-1.00); its row is kept all the
        same, as leaving it out (a zero row) did no better on SmolLM2's 217 requests (neighbourhood 0.84 ×
        against 0.85 ×, drift +5.0 % against +4.5 %; bench/RESULTS.md, session 30). With
        ``hp.subject_after`` also the subject in those frames, averaged (e.g. :data:`keys.SUBJECT_AFTER_STARTS`:
        the text's second position)."""
        alone = [replace(r, prompt="{}") for r in reqs]
        templates = tuple(t for t in self._key_templates(hp) if t.strip() != "{}") or ("{}",)
        sets = [compute_keys(model, tokenizer, spec, alone, layer, templates).double()]
        if hp.subject_start and templates != ("{}",):
            sets.append(compute_keys(model, tokenizer, spec, alone, layer, ("{}",)).double())
        if hp.subject_after:
            sets.append(compute_keys(model, tokenizer, spec, alone, layer, hp.subject_after).double())
        return sets

    def _c0(self, model, tokenizer, spec, layers, hp: EditHparams, fp: str) -> dict[int, torch.Tensor]:
        from editing.stats import corpus_moments

        out, missing = {}, []
        for l in layers:
            key = (fp, spec.mlp_out_name(l), hp.corpus)
            if key in _C0:
                out[l] = _C0[key]
            else:
                missing.append(l)
        if missing:
            got = corpus_moments(model, tokenizer, spec, missing, hp.corpus, hp.stats_dir, fp, progress=False)
            for l, c in got.items():
                _C0[(fp, spec.mlp_out_name(l), hp.corpus)] = c
                out[l] = c
        return out

    def _resolve(self, model, tokenizer, spec, requests, state: EditorState | None, fp: str) -> EditHparams:
        """Layers, λ and locus of this batch: from the state (a line keeps its first batch's choice), else
        the hyperparameters and the model's preset, else measured (:meth:`_measure`). With ``locus="auto"``
        (no preset naming one) both loci are measured, at the calibrated λ or at the λ given, and the one
        whose calibration edits take more often is kept (the subject's on a tie, and without trying the other
        once the subject's all take)."""
        hp = with_model_defaults(self._with_context(model, tokenizer, self.settings_for(model), state, fp), model)
        if state is not None and state.meta.get("layers"):
            return _at_locus(replace(hp, layers=tuple(state.meta["layers"]), lam=state.meta.get("lam", hp.lam),
                                     source=state.meta.get("source", hp.source),
                                     locus=state.meta.get("locus", "subject")))
        hp = with_preset(hp, model)
        loci = LOCI if hp.locus == "auto" else (hp.locus,)
        best, rates = None, {}
        for locus in loci:
            cand, notes, rates[locus] = self._measure(model, tokenizer, spec, requests,
                                                      _at_locus(replace(hp, locus=locus)), fp,
                                                      rate_needed=len(loci) > 1)
            if best is None or rates[locus] > rates[best[0].locus]:
                best = (cand, notes)
            if rates[locus] >= 1.0:
                break
        hp, self._notes = best
        if len(loci) > 1:
            self._notes["locus_trials"] = rates   # calibration success rate per locus tried
        return hp

    def _measure(self, model, tokenizer, spec, requests, hp: EditHparams, fp: str,
                 rate_needed: bool = False) -> tuple[EditHparams, dict, float]:
        """Layers by causal trace at ``hp.locus`` where none are set, λ by :meth:`_calibrate` where none is set.
        Returns the completed hyperparameters, notes for the delta, and the calibration edits' success rate
        at the chosen λ (where λ was given: measured at that λ if ``rate_needed``, else 1.0 unmeasured)."""
        notes: dict[str, Any] = {}
        if hp.layers is None:
            from editing.editors.layers import choose_layers

            traced = [r for r in (self.calibration_requests or requests) if getattr(r, "target_true", None)]
            tr = choose_layers(model, tokenizer, spec, traced[:8], locus=hp.locus)
            hp = replace(hp, layers=tr.layers, source="measured")
            notes["trace_effects"] = [round(e, 4) for e in tr.effects]
        rate = 1.0
        if hp.lam is None or rate_needed:
            reqs = (self.calibration_requests or list(requests))[:4]
            grid = DEFAULT_LAMBDA_GRID if hp.lam is None else (hp.lam,)
            lam, trials = self._calibrate(model, tokenizer, spec, reqs, hp, fp, grid)
            notes["calibration_requests"] = [r.request_id for r in reqs]
            if hp.lam is None:
                hp = replace(hp, lam=lam, source="measured" if hp.source in ("default", "measured")
                             else f"{hp.source}; λ measured")
            notes["lambda_trials"] = trials
            rate = next(t["success"] for t in trials if t["lam"] == lam)
        return hp, notes, rate

    def _with_context(self, model, tokenizer, hp: EditHparams, state: EditorState | None, fp: str) -> EditHparams:
        """``hp`` with the context templates of this edit: explicit ones as given; with
        ``context="generated"`` and the default templates, the model's own generated prefixes
        (from the state when continuing, so every batch of a line uses the same ones)."""
        if hp.context != "generated" or hp.value.context_templates != DEFAULT_CONTEXT_TEMPLATES:
            return hp
        templates = state.meta.get("context_templates") if state is not None else None
        if not templates:
            templates = _generated_templates(model, tokenizer, fp, hp.context_per_start)
        return replace(hp, value=replace(hp.value, context_templates=tuple(templates)))

    def _calibrate(self, model, tokenizer, spec, reqs, hp: EditHparams, fp: str,
                   grid: Sequence[float] = DEFAULT_LAMBDA_GRID):
        """Largest λ of ``grid`` (strongest protection of C0's keys) at which the calibration edits
        take AND are written (nearly) as fully as any λ writes them: every request's target is top-1
        and the worst relative value residual ``max_i ‖z_i − h_L‖ / ‖z_i − h_L⁰‖`` is at most
        ``max(residual_tol, 1.1 × the smallest residual over the grid)`` (values computed once).

        Why the residual: the value ``z`` is optimised over several contexts, so writing it
        (nearly) in full carries the edit to other wordings; the largest λ that merely flips the
        top-1 on the edit prompt writes a sliver of it. Why relative to the grid's best: the
        residual plateaus once λ C0 no longer dominates (on SmolLM2 at ≈ 0.44 for λ ≤ 300: what
        the spread over layers cannot write); smaller λ then only costs locality (λ = 3 kept 0.47
        of the neighbours' top-1 answers), so the knee is taken (bench/RESULTS.md). When no λ makes every
        calibration edit take, the knee is taken among the λ with the best rate (:func:`knee_lambda`).
        """
        layers = list(hp.layers)
        saved = self._save(model, spec, layers)
        trials = []
        try:
            C0 = self._c0(model, tokenizer, spec, layers, hp, fp)
            z = compute_values(model, tokenizer, spec, reqs, layers[-1], hp.value, locus=hp.locus).z.double()
            rows, pos = self._bare_rows(tokenizer, reqs, hp.locus)
            h0 = block_outputs_at(model, spec, layers[-1], rows, pos, pad_id_of(tokenizer)).double()
            for lam in sorted(grid, reverse=True):
                trial = replace(hp, lam=lam, nullspace=False, neuron_share=None)
                self._spread(model, tokenizer, spec, reqs, layers, z, C0, {}, {}, trial)
                top, _ = score_targets(model, tokenizer, [r.text for r in reqs], [r.target_new for r in reqs])
                h = block_outputs_at(model, spec, layers[-1], rows, pos, pad_id_of(tokenizer)).double()
                self._restore(model, saved)
                ratio = float(((z - h).norm(dim=1) / (z - h0).norm(dim=1).clamp(min=1e-12)).max())
                rate = sum(top) / max(len(top), 1)
                trials.append({"lam": lam, "success": rate, "max_relative_residual": round(ratio, 4)})
                if rate >= 1.0 and ratio <= hp.residual_tol:
                    return lam, trials
        finally:
            self._restore(model, saved)
        return knee_lambda(trials, hp.residual_tol), trials

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _save(model, spec, layers) -> dict[str, torch.Tensor]:
        return {spec.mlp_out_name(l): get_module(model, spec.mlp_out_name(l)).weight.detach().clone() for l in layers}

    @staticmethod
    @torch.no_grad()
    def _restore(model, saved: dict[str, torch.Tensor]) -> None:
        for name, w in saved.items():
            get_module(model, name).weight.copy_(w)

    @staticmethod
    def _bare_rows(tokenizer, reqs, locus: str):
        rows = [prompt_ids(tokenizer, r.text) for r in reqs]
        pos = [edit_position(tokenizer, r.prompt, r.subject, locus) for r in reqs]
        return rows, pos

    @torch.no_grad()
    def _release_siblings(self, model, tokenizer, spec, reqs, layers, C_edits, held, hp: EditHparams) -> list[str]:
        """For each request whose subject an earlier batch held as a sibling in this request's prompt
        (``held[subject][prompt] = w``, summed over batches): ``C_edits −= w k kᵀ`` with ``k`` the held
        key as it is now (the subject was held, so edits have barely moved it), and the entry is dropped;
        what the release leaves below zero, where the key did move, is cut (:func:`_cut_below_zero`).
        Returns the request ids released."""
        hit = [(r, held[r.subject].pop(r.prompt)) for r in reqs if r.prompt in held.get(r.subject, {})]
        if not hit:
            return []
        keys = compute_keys_multi(model, tokenizer, spec, [r for r, _ in hit], layers, self._sibling_templates(hp),
                                  locus=hp.locus)
        w = torch.tensor([wt for _, wt in hit], dtype=torch.float64)
        for l in C_edits:
            k = keys[l].double()
            C_edits[l] = _cut_below_zero(C_edits[l] - (k * w[:, None]).T @ k, l, "release_siblings")
        return [r.request_id for r, _ in hit]

    @torch.no_grad()
    def _release_subjects(self, model, tokenizer, spec, reqs, layers, C_edits, holds: dict[str, float],
                          hp: EditHparams) -> list[str]:
        """For each subject of ``reqs`` that earlier batches edited (``holds[subject] = w``, the subject-alone
        weight accumulated by its edits): ``C_edits −= s w Σ_frames XᵀX`` with ``X`` its subject-alone keys as
        they are now and ``s = hp.release_subject`` the share released; the ledger keeps ``(1 − s) w`` (the entry
        is dropped at ``s = 1``). Those holds were taken with the keys as they were once their batch was
        in (``edit``), and later batches hold them in place, so the difference is small; what it leaves below zero
        is cut (:func:`_cut_below_zero`). Returns the subjects released."""
        reps = list({r.subject: r for r in reqs if r.subject in holds}.values())
        if not reps:
            return []
        share = float(hp.release_subject)
        w = torch.tensor([share * holds[r.subject] for r in reps], dtype=torch.float64)
        for r in reps:
            rest = (1.0 - share) * holds.pop(r.subject)
            if rest > 0:
                holds[r.subject] = rest
        for l in C_edits:
            for X in self._subject_alone_keys(model, tokenizer, spec, reps, l, hp):
                C_edits[l] = C_edits[l] - (X * w[:, None]).T @ X
            C_edits[l] = _cut_below_zero(C_edits[l], l, "release_subject")
        return [r.subject for r in reps]

    def _solve(self, K, R, l, C0, ce, P, neurons, Kx, hp: EditHparams, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's factors ``(U, V)`` (MEMIT's solve, or AlphaEdit's with ``nullspace``) on device ``dev``:
        the solve runs where the model runs (float64 either way)."""
        on = (lambda t: t.to(dev) if t is not None else None)
        Kx_dev = [on(x) for x in Kx] if Kx else None
        if hp.nullspace:
            return alphaedit_factors(on(K), on(R), on(P[l]), on(ce), hp.alpha, on(neurons), Kx_dev,
                                     hp.subject_key_weight)
        return memit_factors(on(K), on(R), on(C0[l]), hp.lam, on(ce), on(neurons), K_extra=Kx_dev,
                             extra_weight=hp.subject_key_weight)

    def _sibling_moment(self, model, tokenizer, spec, siblings, l, hp: EditHparams, Ks: torch.Tensor | None = None):
        """``(held, kept)``: the siblings' moment in this batch's solve, ``w K_sᵀK_s`` (plus ``w · w_x Σ X_sᵀX_s``
        of their subject-alone keys, as the edit is fitted there too), and the part accumulated into ``C_edits``
        (the subject-alone part only with ``subject_frame="kept"``). ``Ks``: their prompt keys, if computed."""
        if Ks is None:
            Ks = compute_keys(model, tokenizer, spec, siblings, l, self._sibling_templates(hp), locus=hp.locus).double()
        held = kept = hp.sibling_weight * (Ks.T @ Ks)
        if hp.subject_key_weight:
            Xs = self._subject_alone_keys(model, tokenizer, spec, siblings, l, hp)
            xs = hp.sibling_weight * hp.subject_key_weight * sum(X.T @ X for X in Xs)
            held = held + xs
            if hp.subject_frame == "kept":
                kept = kept + xs
        return held, kept

    @torch.no_grad()
    def _spread(self, model, tokenizer, spec, reqs, layers, z, C0, C_edits, P, hp: EditHparams,
                siblings: Sequence = (), holds: Sequence = (), pool: Sequence = (), again: frozenset = frozenset(),
                noops: Sequence = ()):
        """Write the update layer by layer into ``model`` (in place); returns factors, the moment
        to accumulate per layer (``KᵀK`` of the edit keys, plus ``w K_sᵀK_s`` of the sibling keys and
        ``w_o K_oᵀK_o`` of the held other prompts, :func:`other_prompt_requests`; these are prompt keys only,
        as the subject-alone key of a held prompt is the edit's own; and ``w_t K_tᵀK_t`` of the keys of the
        requests' own text outside the edit, :func:`compute_text_keys`) and, per layer, the candidates of
        ``pool`` held there (``{}`` without a pool).

        ``pool`` (``sibling_pool``): per layer, the update is first solved without siblings; the
        ``siblings × len(reqs)`` candidates with the largest ``‖ΔW k_c‖`` are then held as siblings and the
        layer is solved again.

        ``again``: subjects edited in earlier batches; with ``subject_key_again=False`` their requests' subject-alone
        keys are zero rows (not fitted, not accumulated).

        ``noops``: requests the model already answers (``hold_noops``, :func:`_holdable_noops`): their keys, read
        as a sibling's are (:meth:`_sibling_templates`, so ``release_siblings`` takes out what was put in), are held
        with weight 1 (``+ K_kᵀK_k`` in the solve and in the moment to accumulate)."""
        rows, pos = self._bare_rows(tokenizer, reqs, hp.locus)
        drop = [i for i, r in enumerate(reqs) if r.subject in again] if not hp.subject_key_again else []
        factors, moments = {}, {}
        held_by_layer: dict[int, list] = {}
        keep_frame = hp.subject_frame == "kept"
        for i, l in enumerate(layers):
            name = spec.mlp_out_name(l)
            K = compute_keys(model, tokenizer, spec, reqs, l, self._key_templates(hp), locus=hp.locus).double()
            h = block_outputs_at(model, spec, layers[-1], rows, pos, pad_id_of(tokenizer)).double()
            R = (z.double() - h) / (len(layers) - i)
            neurons = responsible_neurons(K, hp.neuron_share) if hp.neuron_share else None
            ce = C_edits.get(l) if hp.accumulate else None
            moments[l] = K.T @ K
            Kx = None
            if hp.subject_key_weight:
                Kx = self._subject_alone_keys(model, tokenizer, spec, reqs, l, hp)
                for X in Kx:
                    X[drop] = 0.0
                if keep_frame and not hp.release_subject:   # release_subject: held after the batch (edit())
                    moments[l] = moments[l] + hp.subject_key_weight * sum(X.T @ X for X in Kx)
            if siblings:
                ks, kept = self._sibling_moment(model, tokenizer, spec, siblings, l, hp)
                moments[l] = moments[l] + kept
                ce = ks if ce is None else ce + ks
            for held_prompts, w in ((holds, hp.other_prompts_weight), (noops, 1.0)):
                if held_prompts and w:   # prompt keys held as a sibling's: w KᵀK, in the solve and accumulated
                    Kh = compute_keys(model, tokenizer, spec, held_prompts, l, self._sibling_templates(hp),
                                      locus=hp.locus).double()
                    kh = w * (Kh.T @ Kh)
                    moments[l] = moments[l] + kh
                    ce = kh if ce is None else ce + kh
            if hp.text_key_weight:
                Ka = compute_text_keys(model, tokenizer, spec, reqs, l, self._sibling_templates(hp), hp.locus).double()
                ka = hp.text_key_weight * (Ka.T @ Ka)
                moments[l] = moments[l] + ka
                ce = ka if ce is None else ce + ka
            dev = weight_view(get_module(model, name)).device   # the factors come back to the CPU
            u, v = self._solve(K, R, l, C0, ce, P, neurons, Kx, hp, dev)
            if pool:
                Kc = compute_keys(model, tokenizer, spec, pool, l, self._sibling_templates(hp), locus=hp.locus).double()
                leak = ((Kc.to(dev) @ v) @ u.T).norm(dim=1).cpu()
                order = torch.argsort(leak, descending=True)
                if hp.sibling_leak:   # every candidate moved by ≥ sibling_leak × the batch's median own movement
                    own = ((K.to(dev) @ v) @ u.T).norm(dim=1).median().cpu()
                    top = order[: int((leak >= hp.sibling_leak * own).sum())].tolist()
                else:
                    top = order[: hp.siblings * len(reqs)].tolist()
                chosen = held_by_layer[l] = [pool[j] for j in top]
                if chosen:
                    ks, kept = self._sibling_moment(model, tokenizer, spec, chosen, l, hp, Ks=Kc[top])
                    moments[l] = moments[l] + kept
                    ce = ks if ce is None else ce + ks
                    u, v = self._solve(K, R, l, C0, ce, P, neurons, Kx, hp, dev)
            add_to_weight(get_module(model, name), u @ v.T)
            factors[f"{name}.weight"] = (u.float().cpu(), v.float().cpu())
        return factors, moments, held_by_layer

    # ------------------------------------------------------------------ edit
    def edit(self, model: nn.Module, tokenizer, requests: Sequence, state: EditorState | None = None) -> EditResult:
        spec = spec_for(model)
        if state is not None and state.editor and state.editor != self.name:
            raise StateError(f"state belongs to editor {state.editor!r}, not {self.name!r}")
        fp = (state.meta.get("base_fingerprint") if state is not None else None) or self._base_fp \
            or base_fingerprint(model)
        self._notes = {}
        for r in requests:
            check_length(model, tokenizer, r, self.hp.value.context_templates)
        top0, lp_new0 = score_targets(model, tokenizer, [r.text for r in requests], [r.target_new for r in requests])
        noops = [r for r, t in zip(requests, top0) if t]
        if noops and self.hp.on_noop == "raise":
            raise NoOpEditError(f"requests {[r.request_id for r in noops]} already produce their target_new; "
                                "nothing to edit (drop them, or use on_noop='report')")
        active = [r for r, t in zip(requests, top0) if not t]
        hp = self._resolve(model, tokenizer, spec, active or requests, state, fp)
        lams = _pass_lams(hp)   # λ of the first solve and of each repass
        for r in active:  # again with the templates actually used (generated prefixes are longer)
            check_length(model, tokenizer, r, hp.value.context_templates)
        layers = list(hp.layers)
        names = [spec.mlp_out_name(l) for l in layers]
        saved = self._save(model, spec, layers)
        tensors = dict(state.tensors) if state is not None else {}
        held = {k: dict(v) for k, v in (state.meta.get("held_siblings", {}) if state is not None else {}).items()}
        subject_holds = dict(state.meta.get("subject_holds", {})) if state is not None else {}
        n_prev = int(state.meta.get("n_edits", 0)) if state is not None else 0
        prompt_relations = relation_prompts_of(active, {**(hp.relation_prompts or {}), **(
            state.meta.get("prompt_relations", {}) if state is not None else {})})
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        diag: dict[str, RequestDiagnostics] = {}
        noop_after: dict[str, tuple[bool, float]] = {}
        held_noops: list = []
        meta_extra: dict[str, Any] = dict(self._notes)
        try:
            if active:
                C0 = self._c0(model, tokenizer, spec, layers, hp, fp)
                C_edits = {l: tensors[f"{n}::C_edits"].double() for l, n in zip(layers, names)
                           if f"{n}::C_edits" in tensors}
                for on, release, ledger_of, key in (
                        (hp.release_siblings, self._release_siblings, held, "released_siblings"),
                        (hp.release_subject, self._release_subjects, subject_holds, "released_subjects")):
                    if on and C_edits:
                        released = release(model, tokenizer, spec, active, layers, C_edits, ledger_of, hp)
                        for l, n in zip(layers, names):
                            if l in C_edits:
                                tensors[f"{n}::C_edits"] = C_edits[l].float()
                        if released:
                            meta_extra[key] = released
                P = {}
                if hp.nullspace:
                    for l, n in zip(layers, names):
                        if f"{n}::P" not in tensors:  # computed once, kept in the state
                            p, dim = nullspace_projector(C0[l], hp.nullspace_threshold, min_dim=1)
                            tensors[f"{n}::P"] = p.float()
                            meta_extra.setdefault("nullspace_dim", {})[n] = dim
                        P[l] = tensors[f"{n}::P"].double()
                if hp.rewind:
                    for n in names:   # W0 is kept on the CPU, as the state is saved; the weight may be elsewhere
                        w = weight_view(get_module(model, n))
                        tensors.setdefault(f"{n}::W0", w.detach().cpu().clone())
                        add_to_weight(get_module(model, n), tensors[f"{n}::W0"].to(device=w.device, dtype=w.dtype) - w)
                ledger = state.meta.get("subject_prompts", {}) if state is not None else {}
                edited_before = frozenset(ledger)   # subjects of earlier batches (subject_key_again)
                keep = [[t for t in ledger.get(r.subject, []) if t != r.prompt] for r in active]
                holds = []
                if hp.other_prompts:
                    holds = other_prompt_requests(active, prompt_relations, hp.other_prompts, seed=n_prev,
                                                  locus=hp.locus, keys_held=bool(hp.other_prompts_weight))
                vr = compute_values(model, tokenizer, spec, active, layers[-1], hp.value, keep_prompts=keep,
                                    locus=hp.locus, held_prompts=_held_prompts(keep, active, holds),
                                    held_weight=hp.other_prompts_kl)
                self._restore(model, saved)
                # the unit of value.lr_rel in this batch (none with a fixed lr)
                meta_extra["value_sigma"] = vr.scale if hp.value.lr is None else None
                rows, pos = self._bare_rows(tokenizer, active, hp.locus)
                h0 = block_outputs_at(model, spec, layers[-1], rows, pos, pad_id_of(tokenizer)).double()
                z = vr.z.double()
                sibs, pool = [], []
                if hp.siblings and (hp.sibling_pool or hp.sibling_vocab):
                    named = sibling_requests(model, tokenizer, active, hp.sibling_pool, exclude=hp.sibling_exclude,
                                             samples=hp.sibling_samples)
                    named += vocabulary_sibling_requests(model, tokenizer, active, hp.sibling_vocab, hp.sibling_exclude)
                    pool = candidate_requests(active, named, [*ledger, *held], hp.sibling_pool * len(active),
                                              hp.sibling_exclude)
                    meta_extra["sibling_pool"] = len(pool)
                elif hp.siblings:
                    sibs = sibling_requests(model, tokenizer, active, hp.siblings, exclude=hp.sibling_exclude,
                                            samples=hp.sibling_samples)
                if hp.known_siblings:
                    sibs += known_sibling_requests(active, list(ledger), hp.known_siblings, hp.sibling_exclude,
                                                   seed=n_prev)
                if holds:
                    meta_extra["other_prompts"] = len(holds)
                    if hp.accumulate and hp.other_prompts_weight:
                        _record_held(held, holds, hp.other_prompts_weight)
                if sibs:
                    meta_extra["siblings"] = {"n": len(sibs), "examples": sorted({s.subject for s in sibs})[:12]}
                    if hp.accumulate:
                        _record_held(held, sibs, hp.sibling_weight)
                if hp.lam_ladder:
                    meta_extra["first_lam"] = lams[0]
                held_noops = _holdable_noops(noops, active, hp.locus) if hp.hold_noops else []
                if held_noops:
                    meta_extra["held_noops"] = [r.request_id for r in held_noops]
                    if hp.accumulate:   # in the ledger, as a sibling: released when that fact is edited on purpose
                        _record_held(held, held_noops, 1.0)
                factors, moments, held_by_layer = self._spread(model, tokenizer, spec, active, layers, z, C0,
                                                               C_edits, P, replace(hp, lam=lams[0]), sibs, holds, pool,
                                                               again=edited_before, noops=held_noops)
                chosen = list({c.request_id: c for cs in held_by_layer.values() for c in cs}.values())
                if hp.sibling_leak:
                    meta_extra["sibling_leak_held"] = {str(l): len(cs) for l, cs in held_by_layer.items()}
                if chosen:
                    meta_extra["siblings"] = {"n": len(chosen), "examples": sorted({s.subject for s in chosen})[:12]}
                    if hp.accumulate:
                        _record_held(held, chosen, hp.sibling_weight)
                for p in range(hp.repasses):
                    if hp.repass_on == "not_taken":
                        taken, _ = score_targets(model, tokenizer, [r.text for r in active],
                                                 [r.target_new for r in active])
                        redo = [i for i, t in enumerate(taken) if not t]
                    else:
                        h = block_outputs_at(model, spec, layers[-1], rows, pos, pad_id_of(tokenizer)).double()
                        ratio = (z - h).norm(dim=1) / (z - h0).norm(dim=1).clamp(min=1e-12)
                        redo = [i for i, x in enumerate(ratio.tolist()) if x > hp.residual_tol]
                    if not redo:
                        break
                    sub = [active[i] for i in redo]
                    lam_p = lams[p + 1]
                    f2, _, _ = self._spread(model, tokenizer, spec, sub, layers, z[redo], C0, C_edits, P,
                                            replace(hp, lam=lam_p), sibs, holds, pool, again=edited_before, noops=held_noops)
                    merged = LowRankDelta(factors).compose(LowRankDelta(f2)).compact(rank=len(active))
                    factors = merged.factors
                    meta_extra.setdefault("repassed", []).append([active[i].request_id for i in redo])
                    meta_extra.setdefault("repass_lams", []).append(lam_p)
                self._restore(model, saved)
                for l, n in zip(layers, names):
                    if hp.accumulate:
                        prev = tensors.get(f"{n}::C_edits")
                        kk = moments[l].float()
                        tensors[f"{n}::C_edits"] = kk if prev is None else prev + kk
                delta = LowRankDelta(factors=factors, base_fingerprint=fp, editor=self.name,
                                     hyperparameters=hp.to_dict(), request_ids=[r.request_id for r in active])
                # diagnostics with the delta applied temporarily
                delta.apply(model)
                if hp.accumulate and hp.release_subject:
                    for l, n in zip(layers, names):   # the subject-alone hold as the keys are once the batch is in
                        x = hp.subject_key_weight * sum(X.T @ X for X in
                                                        self._subject_alone_keys(model, tokenizer, spec, active, l, hp))
                        tensors[f"{n}::C_edits"] = tensors[f"{n}::C_edits"] + x.float()
                    for r in active:   # and its weight in the ledger a later release reads
                        subject_holds[r.subject] = subject_holds.get(r.subject, 0.0) + hp.subject_key_weight
                h1 = block_outputs_at(model, spec, layers[-1], rows, pos, pad_id_of(tokenizer)).double()
                # the edits, and what the batch's delta did to the requests it did not edit, in one pass
                scored = [*active, *noops]
                top1, lp_new = score_targets(model, tokenizer, [r.text for r in scored], [r.target_new for r in scored])
                noop_after = {r.request_id: (top1[i], lp_new[i]) for i, r in enumerate(scored) if i >= len(active)}
                trues = [r for r in active if r.target_true]
                _, lp_true = score_targets(model, tokenizer, [r.text for r in trues], [r.target_true for r in trues]) \
                    if trues else ([], [])
                self._restore(model, saved)
                lp_true_of = {r.request_id: v for r, v in zip(trues, lp_true)}
                for i, r in enumerate(active):
                    beats = lp_new[i] > lp_true_of[r.request_id] if r.request_id in lp_true_of else None
                    res = float((z[i] - h1[i]).norm())
                    at_start = hp.locus == "subject" and pos[i] == 0
                    diag[r.request_id] = RequestDiagnostics(
                        request_id=r.request_id, succeeded=bool(top1[i]), value_loss=float(vr.loss[i]),
                        residual_norm=res, message="" if top1[i] else _not_taken_message(r, at_start, beats),
                        extra={"beats_true": beats, "logp_new": lp_new[i], "value_nll": float(vr.nll[i]),
                               "locus_at_text_start": at_start,
                               "value_nll_init": float(vr.nll_init[i]),
                               "value_step_doublings": int(vr.escalations[i]),
                               "delta_ratio": float(vr.delta[i].norm() / vr.h[i].norm().clamp(min=1e-12)),
                               "relative_residual": res / max(float((z[i] - h0[i]).norm()), 1e-12)})
            else:
                delta = LowRankDelta(factors={}, base_fingerprint=fp, editor=self.name,
                                     hyperparameters=hp.to_dict(), request_ids=[])
        finally:
            self._restore(model, saved)
        for r in noops:
            before = lp_new0[requests.index(r)]
            still, after = noop_after.get(r.request_id, (True, before))
            message = "no-op: the model already predicts target_new; not edited" if still else (
                "no-op before this batch (the model already predicted target_new, so it was not edited), but the "
                "batch's other edits changed that: target_new is no longer the top prediction; request it again on "
                "the model with this batch applied, where it is an edit")
            diag[r.request_id] = RequestDiagnostics(
                request_id=r.request_id, succeeded=bool(still), message=message,
                extra={"no_op": True, "logp_new": after, "logp_new_before": before})
        diagnostics = [diag[r.request_id] for r in requests]
        failed = [d.request_id for d in diagnostics if not d.succeeded]
        rate = 1 - len(failed) / max(len(diagnostics), 1)
        if failed and rate < hp.warn_below:
            if hp.nullspace:   # AlphaEdit's solve: no λ, the ridge α
                lam_text, knob = f"null-space projection, α={hp.alpha}", "α"
            else:
                lam_text = f"λ={hp.lam}" if len(set(lams)) < 2 else "λ " + " → ".join(f"{x:.6g}" for x in lams)
                knob = "λ"
            broken = [r.request_id for r in noops if r.request_id in failed]
            broken_text = f" ({len(broken)} of them no-ops the batch's other edits changed)" if broken else ""
            msg = (f"{self.name}: {len(failed)}/{len(diagnostics)} edits did not take{broken_text} (layers {layers}, {lam_text}, "
                   f"locus {hp.locus}, choice: {hp.source}); try other layers (--layers), a smaller {knob}, the other "
                   "locus (--set locus=subject|last) or more value steps")
            warnings.warn(msg, EditDidNotTakeWarning, stacklevel=2)
            log.warning(msg)
            meta_extra["warning"] = msg
        delta.meta.update({**meta_extra, "layers": layers, "lam": hp.lam, "locus": hp.locus, "choice": hp.source,
                           "n_noop": len(noops), "success_rate": rate,
                           "mlp_out": spec.stacks[-1].mlp_out, "adapter": spec.source})
        meta = {"base_fingerprint": fp, "layers": layers, "lam": hp.lam, "locus": hp.locus, "source": hp.source,
                "n_edits": n_prev + len(active), "hyperparameters": hp.to_dict(),
                "context_templates": list(hp.value.context_templates)}
        if self._stateful():
            meta["subject_prompts"] = _subject_ledger(state.meta.get("subject_prompts", {}) if state else {}, active)
            meta["held_siblings"] = held
            meta["subject_holds"] = subject_holds
            meta["prompt_relations"] = prompt_relations
        new_state = EditorState(editor=self.name, tensors=tensors if self._stateful() else {}, meta=meta)
        return EditResult(delta=delta, state=new_state, diagnostics=diagnostics)

    def _stateful(self) -> bool:
        return bool(self.hp.accumulate or self.hp.nullspace or self.hp.rewind)

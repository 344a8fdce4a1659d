"""Target values of fact requests: the residual stream that makes the model say ``target_new``.

For request ``i`` let ``h_i`` be the residual stream (output of block ``L``, the last
edited layer) at the edit locus (the subject's last token, or the prompt's last token with
``locus="last"``: :func:`editing.editors.keys.edit_position`). We look for ``δ_i`` such that
adding it there makes ``target_new`` likely, and return ``z_i = h_i + δ_i``:

``loss_i(δ) = NLL(target_new | prompt_c, δ) averaged over context templates c``
``          + kl_weight · KL(p₀ ‖ p_δ) on "{subject} is a"`` (keeps the subject's other properties)
``          + keep_weight · Σ_j KL(p₀ ‖ p_δ) on keep prompt j`` (the prompts of this subject's earlier
``            edits, given by the caller: the edit must not undo them; with keep_contexts the mean over the
``            context templates c of KL on keep prompt j after c)
``          + held_weight · Σ_j KL(p₀ ‖ p_δ) on held prompt j`` (other prompts of the subject whose answers
``            the caller wants left, at a weight of their own)
``          + weight_decay · ‖δ‖² / ‖h‖²``

minimised with Adam (``steps``); each step moves a coordinate of ``δ_i`` by about ``lr_rel · σ`` (``δ = σ u``, Adam
on ``u``; ``σ`` = :func:`residual_scale`, the median ``‖h_t‖/√d`` over the batch's tokens at block ``L``), so the
optimisation, like the clamp and the weight decay, is in units of the residual stream it edits and a model whose
residual is ten times larger (the same function) gets the same ``δ / ‖h‖`` (``bench/residual_scale.py``); a fixed
``lr`` (MEMIT's absolute step, what versions before 2026-12-07 recorded) is used as given instead. With ``lr_rel``,
a request whose NLL is still above ``reach_nll`` when its budget ends and whose ``‖δ‖`` is below the clamp gets
another ``steps`` at twice the step (up to ``escalations`` times; ``ValueResult.escalations``); the others end
with the first budget. A request's ``δ`` is final once its NLL is below
``loss_stop`` (with ``stop="top1"`` also once ``target_new`` is the argmax, token by token, after
every context template: most-probable early stopping), and the loop ends when every request's is; after each step ``‖δ_i‖`` is clamped to
``clamp_norm_factor · ‖h_i‖``. All requests are optimised at once (one ``δ`` row
each; Adam is element-wise, so this equals separate runs but for σ, one median over the batch's texts). The optimisation runs
against whatever model it is given; the caller decides which (the sequential
editor rewinds to the original weights first). The model is left unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from editing.arch import ArchSpec, get_module, uncached
from editing.errors import HyperparameterError
from editing.editors.keys import DEFAULT_CONTEXT_TEMPLATES, edit_position, fill, pad_id_of, pad_right, \
    prompt_ids, target_ids


DEFAULT_CLAMP_NORM_FACTOR = 4.0   # ROME's bound on ‖δ‖ / ‖h‖, where no preset gives one
# The value step in units of residual_scale where no preset gives one: MEMIT's absolute 0.5 at the fact world's
# scale (σ = 8.3–9.7 at its edited block 1), the measured default of every model without a preset; SmolLM2's preset
# gives 0.1 (σ = 5.0–5.3 at its block 8), the same 0.5 there (bench/RESULTS.md, session 52)
DEFAULT_LR_REL = 0.054


@dataclass
class ValueHparams:
    """Hyperparameters of the value optimisation (MEMIT's, but for the step: see ``lr_rel``)."""

    steps: int = 25
    # Adam's step in units of the residual's typical per-coordinate size at the edited block (residual_scale);
    # None: the model's preset, else DEFAULT_LR_REL (default_lr_rel; hparams.with_model_defaults records it)
    lr_rel: float | None = None
    # MEMIT's absolute step (its published 0.5 for GPT-2 XL and GPT-J), used as given instead of lr_rel; None:
    # lr_rel. Versions registered before session 52 record lr=0.5 and are rebuilt with it
    lr: float | None = None
    # a value still short of its target at the end of its budget (NLL > reach_nll) with ‖δ‖ below the clamp gets
    # another `steps` at twice the step, up to `escalations` times (with lr_rel only): how far δ must go in units
    # of ‖h‖ differs by model (SmolLM2 0.76, the tests' tiny Llama up to 1.6), and one fixed step cannot both settle on
    # the first and reach the second within 25 steps
    reach_nll: float = 0.5
    escalations: int = 3
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float | None = None   # None: the model's preset (hparams.with_model_defaults), else 4
    loss_stop: float = 0.05
    # "nll": a request's δ is final once its NLL is below loss_stop; "top1" (ENCORE's most-probable early
    # stopping): also once every token of target_new is the argmax after every context template, so δ stops
    # growing toward certainty once the new target is the model's answer
    stop: str = "nll"
    kl_prompt: str = "{} is a"
    keep_weight: float = 0.0   # weight of the KL on the caller's keep prompts (0: not used)
    # the keep prompts' KL also after each context template (the NLL's wordings), averaged over the templates,
    # so the total weight stays keep_weight: the earlier edit is held in more wordings than its bare prompt. Off: on
    # SmolLM2's 217 (b10, session 34's best setting) paraphrase 0.794 against 0.786, efficacy 0.945 against 0.968,
    # neighbourhood 0.878 × against 0.899 × base (bench/RESULTS.md, session 36)
    keep_contexts: bool = False
    context_templates: tuple[str, ...] = DEFAULT_CONTEXT_TEMPLATES
    chunk: int = 64

    def __post_init__(self) -> None:
        if self.stop not in ("nll", "top1"):
            raise HyperparameterError(f"value stop={self.stop!r} is not one of nll, top1")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                                        and self.lr > 0):
            raise HyperparameterError(f"value lr={self.lr!r} must be a number > 0 (an absolute Adam step) or null "
                                      "(the step in units of the residual, lr_rel)")
        if self.lr_rel is not None and not (isinstance(self.lr_rel, (int, float)) and not isinstance(self.lr_rel, bool)
                                            and self.lr_rel > 0):
            raise HyperparameterError(f"value lr_rel={self.lr_rel!r} must be a number > 0 (Adam's step per "
                                      "coordinate, in units of ‖h‖/√d)")
        if not (isinstance(self.escalations, int) and not isinstance(self.escalations, bool) and self.escalations >= 0):
            raise HyperparameterError(f"value escalations={self.escalations!r} must be a whole number ≥ 0 (0: a "
                                      "value gets one budget of steps)")
        if not (isinstance(self.reach_nll, (int, float)) and not isinstance(self.reach_nll, bool)
                and self.reach_nll > 0):
            raise HyperparameterError(f"value reach_nll={self.reach_nll!r} must be a number > 0")
        if not isinstance(self.keep_contexts, bool):
            raise HyperparameterError(f"value keep_contexts={self.keep_contexts!r} must be true or false")


@dataclass
class ValueResult:
    """``z = h + delta`` per request, with the optimisation's record."""

    z: torch.Tensor           # (n, d_model) target residual at block L, at the locus
    h: torch.Tensor           # (n, d_model) the residual before the edit
    delta: torch.Tensor       # (n, d_model)
    loss: list[float]         # final total loss per request
    nll: list[float]          # final NLL of target_new per request
    nll_init: list[float]     # NLL before optimisation
    steps: int = 0
    history: list[float] = field(default_factory=list)  # mean loss per step
    escalations: list[int] = field(default_factory=list)  # per request: how often its step was doubled
    scale: float = 1.0        # σ, the unit of lr_rel before any doubling (residual_scale); 1.0 with an absolute lr


def _block_output_hook(delta: torch.Tensor, row_req: torch.Tensor, row_pos: torch.Tensor, record: dict):
    ar = torch.arange(len(row_req), device=row_req.device)

    def hook(_module, _args, output):
        hs = output[0] if isinstance(output, tuple) else output
        record["h"] = hs[ar, row_pos].detach()
        add = torch.zeros_like(hs)
        add[ar, row_pos] = delta[row_req].to(hs.dtype)
        hs = hs + add
        if isinstance(output, tuple):
            return (hs, *output[1:])
        return hs
    return hook


def _selected_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor) -> torch.Tensor:
    """Logits at positions ``(rows[i], cols[i])`` only: ``(len(rows), vocab)``.

    The base model's last hidden state goes through the output embedding at the selected
    positions; models whose logits are more than that (a ``logit_scale`` or soft-capping in
    the config) or that expose no base model / output embedding take the full forward.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    cfg = getattr(model, "config", None)
    special = any(getattr(cfg, a, None) not in (None, 1.0) for a in ("logit_scale", "final_logit_softcapping",
                                                                         "logits_scaling", "output_multiplier"))
    special = special or hasattr(model, "final_logits_bias")
    if head is None or base is None or base is model or special or not isinstance(head, nn.Linear):
        return uncached(model, input_ids=ids, attention_mask=mask).logits[rows, cols]
    hs = uncached(base, input_ids=ids, attention_mask=mask).last_hidden_state
    return head(hs[rows, cols])


def compute_values(model: nn.Module, tokenizer, spec: ArchSpec, requests: Sequence, layer: int,
                   hp: ValueHparams | None = None, stack: str | None = None,
                   keep_prompts: Sequence[Sequence[str]] | None = None, locus: str = "subject",
                   held_prompts: Sequence[Sequence[str]] | None = None, held_weight: float = 0.0) -> ValueResult:
    """Optimise ``δ`` at block ``layer``'s output, at the ``locus``, for every request (see module doc).

    ``keep_prompts[i]``: prompt templates (with ``{}``) whose next-token distribution request ``i``'s
    ``δ`` must leave as the given model has it (weight ``hp.keep_weight``); ``held_prompts[i]`` likewise,
    at weight ``held_weight`` (0: not used). The KL terms add ``δ`` at the
    same locus of the other prompt; at ``locus="last"`` that is not where those prompts' keys are, so
    they act as a general regulariser of ``δ`` (measured on the fact world, 100 edits: neighbourhood
    0.82 × base with them, 0.71 × without; bench/RESULTS.md "edit locus")."""
    hp = hp or ValueHparams()
    clamp = hp.clamp_norm_factor if hp.clamp_norm_factor is not None else DEFAULT_CLAMP_NORM_FACTOR
    # Adam's lr on u: the fixed step as given, else the relative one (σ carries the unit)
    lr = hp.lr if hp.lr is not None else (hp.lr_rel if hp.lr_rel is not None else default_lr_rel(model))
    templates = list(hp.context_templates) or ["{}"]
    if templates[0] != "{}":
        templates = ["{}", *templates]
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    rows, pos, req, tgt_start, tgt = [], [], [], [], []
    for i, r in enumerate(requests):
        t_ids = target_ids(tokenizer, r.target_new)
        for ctx in templates:
            template = fill(ctx, r.prompt)
            p_ids = prompt_ids(tokenizer, fill(template, r.subject))
            rows.append(p_ids + t_ids[:-1])
            pos.append(edit_position(tokenizer, template, r.subject, locus))
            req.append(i)
            tgt_start.append(len(p_ids) - 1)
            tgt.append(t_ids)
    kl_rows, kl_pos, kl_req, kl_last, kl_w = [], [], [], [], []

    def add_kl_row(i: int, prompt: str, weight: float) -> None:
        ids = prompt_ids(tokenizer, fill(prompt, requests[i].subject))
        kl_rows.append(ids)
        kl_pos.append(edit_position(tokenizer, prompt, requests[i].subject, locus))
        kl_req.append(i)
        kl_last.append(len(ids) - 1)
        kl_w.append(weight)

    for i, r in enumerate(requests):
        if hp.kl_weight > 0:
            add_kl_row(i, hp.kl_prompt, hp.kl_weight)
        if hp.keep_weight > 0 and keep_prompts is not None:
            for prompt in keep_prompts[i]:
                if hp.keep_contexts:
                    for ctx in templates:
                        add_kl_row(i, fill(ctx, prompt), hp.keep_weight / len(templates))
                else:
                    add_kl_row(i, prompt, hp.keep_weight)
        if held_weight > 0 and held_prompts is not None:
            for prompt in held_prompts[i]:
                add_kl_row(i, prompt, held_weight)
    all_rows = rows + kl_rows
    all_pos = torch.tensor(pos + kl_pos)
    all_req = torch.tensor(req + kl_req)
    n_main = len(rows)
    n = len(requests)
    block = get_module(model, spec.layer_name(layer, stack))

    # labels for the NLL rows: -100 except target positions
    ids_full, mask_full = pad_right(all_rows, pad)
    labels = torch.full_like(ids_full, -100)
    for j in range(n_main):
        for k, t in enumerate(tgt[j]):
            labels[j, tgt_start[j] + k] = t
    ids_full, mask_full, labels = ids_full.to(device), mask_full.to(device), labels.to(device)

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    d_model = None
    delta = None     # σ ⊙ u, the added residual (None on the first pass, which only reads h)
    u = None         # what Adam moves
    sigma = None     # (n, 1): σ (residual_scale), doubled per escalation of a row; 1 with an absolute lr
    h = None
    kl_ref = None
    kl_weights = torch.tensor(kl_w, device=device, dtype=torch.float32)
    opt = None
    history: list[float] = []
    nll_init: list[float] = []
    nll_req = torch.zeros(n)
    loss_req = torch.zeros(n)
    steps_done = 0
    escalated = torch.zeros(n, dtype=torch.long)
    tok_norms: list[torch.Tensor] = []   # the first pass's token norms at block L (residual_scale)
    scale = 1.0                          # σ before any doubling; 1 with an absolute lr
    final = torch.zeros(n, dtype=torch.bool)   # ended with the first budget: never run again
    try:
        for p in params:
            p.requires_grad_(False)
        live = torch.ones(n, dtype=torch.bool)   # requests still optimised (NLL ≥ loss_stop)
        prev_kl = torch.zeros(n)
        budget = hp.steps                         # the step at which the optimisation ends, unless escalated
        step = -1
        while True:
            step += 1
            record: dict = {}
            nll_sum = torch.zeros(n, device=device)
            nll_cnt = torch.zeros(n, device=device)
            wrong = torch.zeros(n, device=device)   # target tokens that are not the argmax, over all templates
            kl_per = torch.zeros(n, device=device)
            h_rows = []
            if u is not None:
                opt.zero_grad()
            order = [j for j in range(len(all_rows)) if delta is None or bool(live[int(all_req[j])])]
            for c in range(0, len(order), hp.chunk):
                ix = torch.tensor(order[c:c + hp.chunk])
                width = int(mask_full[ix].sum(1).max())
                # a fresh σ ⊙ u per chunk: each chunk's backward frees its own graph
                d_arg = u * sigma if u is not None else None
                if d_arg is None:
                    # first pass: find d_model and h without any addition
                    def hook0(_m, _a, output):
                        hs = output[0] if isinstance(output, tuple) else output
                        ar = torch.arange(hs.shape[0], device=hs.device)
                        record["h"] = hs[ar, all_pos[ix].to(hs.device)].detach()
                        # every token's ‖h‖ but the first (a BOS-less model's attention sink) and the padding
                        m = mask_full[ix, :hs.shape[1]].to(hs.device).bool().clone()
                        m[:, 0] = False
                        tok_norms.append(hs.detach().float().norm(dim=-1)[m])
                    handle = block.register_forward_hook(hook0)
                else:
                    handle = block.register_forward_hook(
                        _block_output_hook(d_arg, all_req[ix].to(device), all_pos[ix].to(device), record))
                try:
                    with torch.set_grad_enabled(delta is not None):
                        lab = labels[ix, :width]
                        rq = all_req[ix].to(device)
                        main = ix.to(device) < n_main
                        # only the positions the loss reads go through the output head (target tokens
                        # of the NLL rows, the last token of the KL rows): a vocabulary-sized
                        # log-softmax at every position was most of the memory and a good share of the time
                        sel_r, sel_c = torch.nonzero(lab >= 0, as_tuple=True)
                        kl_idx = torch.nonzero(~main).squeeze(1)
                        last = torch.tensor([kl_last[int(ix[int(j)]) - n_main] for j in kl_idx], device=device,
                                            dtype=torch.long)
                        logp_sel = F.log_softmax(_selected_logits(
                            model, ids_full[ix, :width], mask_full[ix, :width], torch.cat([sel_r, kl_idx]),
                            torch.cat([sel_c, last])).float(), -1)
                        n_sel = len(sel_r)
                        tok_lp = logp_sel[:n_sel].gather(1, lab[sel_r, sel_c].unsqueeze(1)).squeeze(1)
                        rows_here = len(ix)
                        lp_sum = torch.zeros(rows_here, device=device).index_add(0, sel_r, tok_lp)
                        cnt = torch.zeros(rows_here, device=device).index_add(
                            0, sel_r, torch.ones_like(tok_lp))
                        row_nll = -lp_sum / cnt.clamp(min=1)
                        if hp.stop == "top1":
                            miss = (logp_sel[:n_sel].argmax(-1) != lab[sel_r, sel_c]).float().detach()
                            row_miss = torch.zeros(rows_here, device=device).index_add(0, sel_r, miss)
                            wrong = wrong.index_add(0, rq, row_miss * main)
                        nll_sum = nll_sum.index_add(0, rq, (row_nll * main).detach())
                        nll_cnt = nll_cnt.index_add(0, rq, main.float())
                        if (~main).any():
                            cur = logp_sel[n_sel:]
                            if kl_ref is None:
                                record.setdefault("kl_ref", []).append(cur.detach())
                            else:
                                kl_row = ix[kl_idx.cpu()] - n_main   # index among the KL rows
                                ref = kl_ref[kl_row.to(device)]
                                kl = kl_weights[kl_row.to(device)] * (ref.exp() * (ref - cur)).sum(-1)
                                kl_per = kl_per.index_add(0, rq[kl_idx], kl.detach())
                        if delta is not None:
                            chunk_loss = (row_nll * main).sum() / len(templates)
                            # KL of this chunk only (kl_per accumulates across chunks): add it here
                            if (~main).any():
                                chunk_loss = chunk_loss + kl.sum()
                            if c == 0:
                                wd = hp.weight_decay * ((d_arg.norm(dim=1) / h.norm(dim=1).clamp(min=1e-8)) ** 2)
                                chunk_loss = chunk_loss + wd.sum()
                            chunk_loss.backward()
                finally:
                    handle.remove()
                h_rows.append(record["h"])
            if delta is not None:
                # requests that converged earlier were not run: keep their last (exact) values
                fresh = nll_cnt.cpu() > 0
                nll_sum = torch.where(fresh.to(device), nll_sum, nll_req.to(device) * nll_cnt.clamp(min=1))
                kl_per = torch.where(fresh.to(device), kl_per, prev_kl.to(device))
                prev_kl = kl_per.detach().cpu()
            nll = (nll_sum / nll_cnt.clamp(min=1)).detach().cpu()
            if hp.stop == "top1":   # a request not run this step (already final) stays final
                on_top = (wrong.cpu() == 0) | ((nll_cnt.cpu() == 0) & (delta is not None))
            else:
                on_top = torch.zeros(n, dtype=torch.bool)
            if delta is None:
                hr = torch.cat(h_rows).float()
                first = torch.tensor([req.index(i) for i in range(n)])
                h = hr[first].to(device)
                d_model = h.shape[1]
                if hp.lr is None:
                    scale = residual_scale(torch.cat(tok_norms), d_model)
                sigma = torch.full((n, 1), scale, device=device)
                u = torch.zeros((n, d_model), device=device, requires_grad=True)
                delta = (u * sigma).detach()
                opt = torch.optim.Adam([u], lr=lr)
                if kl_rows:  # the first pass ran every row in order: one reference per KL row
                    kl_ref = torch.cat(record.get("kl_ref", []))
                nll_init = nll.tolist()
                nll_req = nll
                loss_req = nll.clone()
                if bool(((nll < hp.loss_stop) | on_top).all()):
                    break
                continue
            with torch.no_grad():
                wd = hp.weight_decay * ((delta.norm(dim=1) / h.norm(dim=1).clamp(min=1e-8)) ** 2)
                loss_req = (nll + (kl_per + wd).detach().cpu())
                nll_req = nll
            history.append(float(loss_req.mean()))
            steps_done = step
            done = (nll < hp.loss_stop) | on_top | final
            if step >= budget and not bool(done.all()):
                stuck = _stuck(hp, nll, done, delta, h, clamp, escalated)
                if not bool(stuck.any()):
                    break
                with torch.no_grad():   # the same δ, twice the step: σ doubles, u halves
                    sigma[stuck.to(device)] *= 2.0
                    u[stuck.to(device)] /= 2.0
                escalated += stuck.long()
                opt = torch.optim.Adam([u], lr=lr)
                budget = step + hp.steps
                final |= ~stuck          # the others end with the budget that just ran out
                done = done | final
            if bool(done.all()):
                break
            live = ~done
            frozen = (~live).to(device)
            keep = u.detach().clone()
            opt.step()
            with torch.no_grad():
                u[frozen] = keep[frozen]
                limit = clamp * h.norm(dim=1, keepdim=True)
                norm = (u * sigma).norm(dim=1, keepdim=True).clamp(min=1e-12)
                u.mul_(torch.clamp(limit / norm, max=1.0))
                delta = (u * sigma).detach()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    d = delta.detach().cpu()
    hh = h.detach().cpu()
    return ValueResult(z=hh + d, h=hh, delta=d, loss=loss_req.tolist(), nll=nll_req.tolist(), nll_init=nll_init,
                       steps=steps_done, history=history, escalations=escalated.tolist(),
                       scale=scale)


def default_lr_rel(model: nn.Module) -> float:
    """The value step where none is given: the model's preset's (``Preset.value_lr_rel``), else
    :data:`DEFAULT_LR_REL`."""
    from editing.editors.presets import preset_for

    p = preset_for(model) if hasattr(model, "config") else None
    return p.value_lr_rel if p is not None and p.value_lr_rel else DEFAULT_LR_REL


def residual_scale(token_norms: torch.Tensor, d_model: int) -> float:
    """``σ = median_t ‖h_t‖ / √d`` over the given tokens' residuals: the residual stream's typical per-coordinate
    size at the edited block, the unit of ``lr_rel``. One number per layer and batch (the median over every token
    of the batch's texts, not the locus alone), so requests whose locus happens to carry a large or small
    residual take the same step, as under MEMIT's absolute ``lr``."""
    return max(float(token_norms.median()) / math.sqrt(d_model), 1e-12)


def _stuck(hp: ValueHparams, nll: torch.Tensor, done: torch.Tensor, delta: torch.Tensor, h: torch.Tensor,
           clamp: float, escalated: torch.Tensor) -> torch.Tensor:
    """Requests whose value gets another budget at twice the step: not final, NLL still above ``reach_nll``,
    ``‖δ‖`` short of the clamp (a larger step can still go further), fewer than ``escalations`` doublings so far;
    never with an absolute ``lr`` (MEMIT's fixed budget, as recorded versions were made)."""
    if hp.lr is not None or hp.steps == 0:
        return torch.zeros_like(done)
    room = (delta.norm(dim=1) < 0.99 * clamp * h.norm(dim=1)).cpu()
    return ~done & (nll > hp.reach_nll) & room & (escalated < hp.escalations)

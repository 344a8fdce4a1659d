"""Keys of fact requests: the input of ``W_out`` at the edit locus (by default the subject's last token).

For a request with prompt template ``"{} is the capital of"`` and subject
``"Paris"``, the key at layer ``l`` is the MLP hidden activation (the input of
``W_out``) at the last token of ``"Paris"``. MEMIT averages it over the bare
prompt and a few short *context templates* (``"{}"`` is the bare prompt;
``"Here is a fact. {}"`` puts a prefix before it), so the edit does not depend on
what came before the subject.

Tokenisation rules (shared by keys, values and diagnostics):
- a prompt is encoded with the tokenizer's special tokens (BOS where it adds one),
  minus a trailing EOS some tokenizers append;
- a target is encoded without special tokens, with one leading space
  (CounterFact convention: ``"Paris"`` is scored as ``" Paris"``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from editing.arch import ArchSpec, get_module, uncached
from editing.errors import EmptyTargetError, HyperparameterError, PromptTooLongError, SubjectNotInPromptError

DEFAULT_CONTEXT_TEMPLATES: tuple[str, ...] = ("{}", "Here is a fact. {}", "I read this today. {}",
                                              "Note that {}", "As everyone knows, {}")


class _StopForward(Exception):
    pass


def fill(template: str, subject: str) -> str:
    """``template`` with its first ``{}`` replaced by ``subject`` (no other brace handling)."""
    return template.replace("{}", subject, 1)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: with special tokens, minus a trailing EOS."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if len(ids) > 1 and eos is not None and ids[-1] == eos and not text.endswith(str(tokenizer.eos_token)):
        ids = ids[:-1]
    return ids


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a target continuation: one leading space, no special tokens."""
    if not target or not target.strip():
        raise EmptyTargetError("the target is empty or whitespace; give the text the model should produce")
    text = target if target.startswith(" ") else " " + target
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EmptyTargetError(f"the target {target!r} encodes to no tokens")
    return ids


def subject_last_token(tokenizer, prompt_template: str, subject: str) -> int:
    """Index (in :func:`prompt_ids` of the filled prompt) of the subject's last token.

    ``prompt_template`` holds ``{}`` where the subject goes. Raises
    :class:`SubjectNotInPromptError` when it has no ``{}`` (and does not contain the
    subject) or the subject maps to no token.
    """
    return _subject_span(tokenizer, prompt_template, subject)[0][-1]


def subject_positions(tokenizer, prompt_template: str, subject: str) -> list[int]:
    """Indices (in :func:`prompt_ids` of the filled prompt) of every token of the subject, in order; the last
    is :func:`subject_last_token`. Same checks. A template without ``{}`` that contains the subject (a
    paraphrase as written) is read with the subject's first occurrence as the slot."""
    return _subject_span(tokenizer, prompt_template, subject)[0]


def _subject_span(tokenizer, prompt_template: str, subject: str) -> tuple[list[int], int]:
    """``(the subject's token indices, prompt's last token)`` in :func:`prompt_ids` of the filled prompt,
    with :func:`subject_last_token`'s checks. Fast tokenizers: the tokens whose character offsets overlap
    the subject. Slow tokenizers: from the length of the encoded text up to the subject's start to the
    length up to its end."""
    if not subject or not subject.strip():
        raise SubjectNotInPromptError("the subject is empty; give the entity the fact is about")
    if "{}" not in prompt_template:
        if subject in prompt_template:
            prompt_template = prompt_template.replace(subject, "{}", 1)
        else:
            raise SubjectNotInPromptError(
                f"subject {subject!r} does not occur in prompt {prompt_template!r}; "
                "write the prompt with '{}' where the subject goes")
    start = prompt_template.index("{}")
    end = start + len(subject)
    text = fill(prompt_template, subject)
    ids = prompt_ids(tokenizer, text)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        span = [i for i, (s, e) in enumerate(enc["offset_mapping"][: len(ids)]) if e > s and s < end and e > start]
        if span:
            return span, len(ids) - 1
    n = len(prompt_ids(tokenizer, text[:end]))
    if n == 0:
        raise SubjectNotInPromptError(f"subject {subject!r} maps to no token in {text!r}")
    first = min(len(prompt_ids(tokenizer, text[:start])) if start else 0, n - 1)
    return list(range(first, n)), len(ids) - 1


LOCI = ("subject", "last")


def edit_position(tokenizer, prompt_template: str, subject: str, locus: str = "subject") -> int:
    """Index (in :func:`prompt_ids` of the filled prompt) of the edit locus.

    ``"subject"``: the subject's last token (ROME/MEMIT: large LMs enrich the subject's last
    token with its attributes in early-middle MLPs). ``"last"``: the prompt's last token, where
    the answer is predicted (models that look a fact up there, from the subject tokens read by
    attention, as the project's small fact-world model does: bench/RESULTS.md "edit locus").
    The subject is checked as by :func:`subject_last_token` at either locus.
    """
    if locus not in LOCI:
        raise HyperparameterError(f"unknown locus {locus!r}; use one of {LOCI}")
    span, last = _subject_span(tokenizer, prompt_template, subject)
    return span[-1] if locus == "subject" else last


def max_context(model: nn.Module) -> int | None:
    """The model's context length from its config, or ``None`` where it has none."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def within_context(model: nn.Module, max_length: int) -> int:
    """``max_length`` capped at the model's context (:func:`max_context`), for truncating texts before a forward."""
    limit = max_context(model)
    return min(max_length, limit) if limit else max_length


def check_length(model: nn.Module, tokenizer, request, context_templates: Sequence[str] = ("{}",)) -> None:
    """Raise :class:`PromptTooLongError` when prompt (with its longest prefix) plus target exceeds the context."""
    limit = max_context(model)
    if limit is None:
        return
    longest = max(context_templates, key=len)
    n = len(prompt_ids(tokenizer, fill(fill(longest, request.prompt), request.subject))) + len(
        target_ids(tokenizer, request.target_new))
    if n > limit:
        raise PromptTooLongError(
            f"request {request.request_id!r}: prompt plus target is {n} tokens but the model's context is {limit}; "
            "shorten the prompt (or the context templates)")


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (causal positions before padding are unaffected)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


@torch.no_grad()
def module_inputs_at(model: nn.Module, module_names: Sequence[str], rows: Sequence[Sequence[int]],
                     positions: Sequence[int], pad_id: int = 0, chunk: int = 32) -> dict[str, torch.Tensor]:
    """Input of each module at ``positions[i]`` of ``rows[i]``: ``{name: (len(rows), d_in)}`` (float32).
    Equal rows run through the model once, whatever positions are read from them."""
    names = list(module_names)
    order = {n: i for i, n in enumerate(dict(model.named_modules()))}
    last = max(names, key=lambda n: order.get(n, 0))
    unique: dict[tuple[int, ...], int] = {}
    row_of = [unique.setdefault(tuple(r), len(unique)) for r in rows]
    distinct = [list(r) for r in unique]
    by_chunk: dict[int, list[int]] = {}   # chunk index → the requests whose row lies in it
    for i, u in enumerate(row_of):
        by_chunk.setdefault(u // chunk, []).append(i)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    taken: list[int] = []   # which request each gathered input answers, in gathering order
    device = next(model.parameters()).device
    for c in range(0, len(distinct), chunk):
        wanted = by_chunk[c // chunk]
        taken.extend(wanted)
        ids, mask = pad_right(distinct[c:c + chunk], pad_id)
        ar = torch.tensor([row_of[i] - c for i in wanted], device=device)
        pos = torch.tensor([positions[i] for i in wanted], device=device)

        def make_hook(name):
            def hook(_m, args):
                out[name].append(args[0][ar, pos].detach().float().cpu())
                if name == last:
                    raise _StopForward
            return hook

        handles = [get_module(model, n).register_forward_pre_hook(make_hook(n)) for n in names]
        try:
            uncached(model, input_ids=ids.to(device), attention_mask=mask.to(device))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
    back = torch.argsort(torch.tensor(taken)) if taken else torch.zeros(0, dtype=torch.long)
    return {n: torch.cat(v)[back] for n, v in out.items()}


def key_rows(tokenizer, requests: Sequence, context_templates: Sequence[str],
             locus: str = "subject") -> tuple[list[list[int]], list[int]]:
    """Token rows and locus positions: for each request, each context template (request-major order)."""
    rows, positions = [], []
    for r in requests:
        for ctx in context_templates:
            template = fill(ctx, r.prompt)
            positions.append(edit_position(tokenizer, template, r.subject, locus))
            rows.append(prompt_ids(tokenizer, fill(template, r.subject)))
    return rows, positions


def text_key_rows(tokenizer, requests: Sequence, context_templates: Sequence[str] = ("{}",),
                  locus: str = "subject") -> tuple[list[list[int]], list[int]]:
    """Token rows and positions of every token of each request's own text but the edit locus: for each
    request and template, the filled prompt's tokens other than the locus (:func:`edit_position`), then the
    prompt followed by its ``target_true`` (where known) and by its ``target_new`` (:func:`target_ids`) at
    each answer token. One row per position."""
    rows, positions = [], []
    for r in requests:
        for ctx in context_templates:
            template = fill(ctx, r.prompt)
            p = prompt_ids(tokenizer, fill(template, r.subject))
            at = edit_position(tokenizer, template, r.subject, locus)
            for i in range(len(p)):
                if i != at:
                    rows.append(p)
                    positions.append(i)
            for target in (r.target_true, r.target_new):
                if not target:
                    continue
                t = target_ids(tokenizer, target)
                for j in range(len(t)):
                    rows.append(p + t)
                    positions.append(len(p) + j)
    return rows, positions


def compute_text_keys(model: nn.Module, tokenizer, spec: ArchSpec, requests: Sequence, layer: int,
                      context_templates: Sequence[str] = ("{}",), locus: str = "subject",
                      stack: str | None = None) -> torch.Tensor:
    """Keys ``(m, d_in)`` of layer ``layer``'s ``W_out`` at every position of :func:`text_key_rows`."""
    rows, positions = text_key_rows(tokenizer, requests, context_templates, locus)
    name = spec.mlp_out_name(layer, stack)
    return module_inputs_at(model, [name], rows, positions, pad_id=pad_id_of(tokenizer))[name]


def compute_keys_multi(model: nn.Module, tokenizer, spec: ArchSpec, requests: Sequence, layers: Sequence[int],
                       context_templates: Sequence[str] = DEFAULT_CONTEXT_TEMPLATES,
                       stack: str | None = None, locus: str = "subject") -> dict[int, torch.Tensor]:
    """:func:`compute_keys` for several layers in one forward pass: ``{layer: (n, d_in)}``."""
    templates = list(context_templates) or ["{}"]
    rows, positions = key_rows(tokenizer, requests, templates, locus)
    names = {spec.mlp_out_name(l, stack): l for l in layers}
    ins = module_inputs_at(model, list(names), rows, positions, pad_id=pad_id_of(tokenizer))
    return {l: ins[n].reshape(len(requests), len(templates), -1).mean(1) for n, l in names.items()}


def compute_keys(model: nn.Module, tokenizer, spec: ArchSpec, requests: Sequence, layer: int,
                 context_templates: Sequence[str] = DEFAULT_CONTEXT_TEMPLATES, stack: str | None = None,
                 locus: str = "subject") -> torch.Tensor:
    """Keys ``(n, d_in)``: input of layer ``layer``'s ``W_out`` at each request's locus (:func:`edit_position`),
    averaged over ``context_templates`` (each holds ``{}`` where the prompt goes)."""
    return compute_keys_multi(model, tokenizer, spec, requests, [layer], context_templates, stack, locus)[layer]


@torch.no_grad()
def block_outputs_at(model: nn.Module, spec: ArchSpec, layer: int, rows: Sequence[Sequence[int]],
                     positions: Sequence[int], pad_id: int = 0, stack: str | None = None,
                     chunk: int = 32) -> torch.Tensor:
    """Residual stream after block ``layer`` at ``positions[i]`` of ``rows[i]``: ``(len(rows), d_model)``."""
    block = get_module(model, spec.layer_name(layer, stack))
    device = next(model.parameters()).device
    outs = []
    for c in range(0, len(rows), chunk):
        ids, mask = pad_right(rows[c:c + chunk], pad_id)
        pos = torch.tensor(list(positions[c:c + chunk]), device=device)
        ar = torch.arange(len(pos), device=device)

        def hook(_m, _a, output):
            hs = output[0] if isinstance(output, tuple) else output
            outs.append(hs[ar, pos].detach().float().cpu())
            raise _StopForward

        handle = block.register_forward_hook(hook)
        try:
            uncached(model, input_ids=ids.to(device), attention_mask=mask.to(device))
        except _StopForward:
            pass
        finally:
            handle.remove()
    return torch.cat(outs)


@torch.no_grad()
def score_targets(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                  chunk: int = 32) -> tuple[list[bool], list[float]]:
    """Per (prompt, target): teacher-forced top-1 (every target token is the argmax) and ``log P(target | prompt)``."""
    rows, starts, tgts = [], [], []
    for p, t in zip(prompts, targets):
        p_ids, t_ids = prompt_ids(tokenizer, p), target_ids(tokenizer, t)
        rows.append(p_ids + t_ids[:-1])
        starts.append(len(p_ids) - 1)
        tgts.append(t_ids)
    device = next(model.parameters()).device
    top, lp = [], []
    for c in range(0, len(rows), chunk):
        ids, mask = pad_right(rows[c:c + chunk], pad_id_of(tokenizer))
        logits = uncached(model, input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits, -1)
        for j in range(ids.shape[0]):
            s, t = starts[c + j], tgts[c + j]
            span = logp[j, s: s + len(t)]
            top.append(span.argmax(-1).tolist() == t)
            lp.append(float(span.gather(1, torch.tensor(t, device=device).unsqueeze(1)).sum()))
    return top, lp


GENERATION_STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
# the subject right after one of those words: the text's second position (EditHparams.subject_after)
SUBJECT_AFTER_STARTS: tuple[str, ...] = tuple(f"{word} {{}}" for word in GENERATION_STARTS)


@torch.no_grad()
def generated_context_templates(model: nn.Module, tokenizer, starts: Sequence[str] = GENERATION_STARTS,
                                length: int = 10, top_k: int = 5, seed: int = 0, per_start: int = 1) -> tuple[str, ...]:
    """MEMIT's context templates: the bare prompt ``"{}"`` plus ``per_start`` prefixes per word of ``starts``
    (MEMIT: one; ROME drew 20 in all), continued by the model itself for ``length`` tokens (top-``k`` sampling,
    k=5, as MEMIT, under a fixed seed) and ending in ``". {}"``. The prefixes are drawn round by round (each
    start once per round) from one seeded stream, so the first ``len(starts)`` are the same for every
    ``per_start``.

    Text the model generates is, by construction, text it finds ordinary, whatever
    its vocabulary or training data (a fixed English prefix is out of distribution for
    a model trained on a private world). The seeded sampling (global RNG state saved and
    restored) makes the templates a function of the weights and ``seed``; greedy decoding
    was tried and degenerates on small models ("The-the-world-is-a-world"). Braces and line breaks in the generations are replaced
    by spaces.
    """
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    was_training = model.training
    model.eval()
    out = ["{}"]
    words = list(starts) * per_start   # round by round: each start once per round
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            gens = [model.generate(input_ids=torch.tensor([prompt_ids(tokenizer, s)], device=device),
                                   attention_mask=torch.ones((1, len(prompt_ids(tokenizer, s))), dtype=torch.long,
                                                             device=device),
                                   max_new_tokens=length, min_new_tokens=length, do_sample=True, top_k=top_k,
                                   top_p=1.0, temperature=1.0, pad_token_id=pad)
                    for s in words]
        for s, gen in zip(words, gens):
            text = tokenizer.decode(gen[0], skip_special_tokens=True)
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            out.append((text or s) + ". {}")
    finally:
        model.train(was_training)
    return tuple(out)

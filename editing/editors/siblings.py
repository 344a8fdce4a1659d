"""Sibling subjects: entities of the same kind as an edited subject, named by the model itself.

Why: the closed-form solve protects the keys in ``C0`` (general text) and the keys of
earlier edits, but not the keys of *other subjects in the same relation* ("The
capital of Germany is" while "The capital of France" is edited). Those keys lie close
to the edited key, so ``ΔW`` moves them too — CounterFact's neighbourhood score
measures exactly that damage. With ``siblings = n`` the editor asks the model for
``n`` entities like each subject and adds their keys to the preserved moment:

    ΔW = Rᵀ K (λ C0 + C_edits + w K_sᵀ K_s + KᵀK)⁻¹

(``w`` = ``sibling_weight``), i.e. it asks ``ΔW k_s ≈ 0`` for every sibling key ``k_s``
(the bare prompt with the sibling in the subject's place, key at the sibling's last
token), with the same weight as the edit keys' own fit when ``w = 1``.

How siblings are named: the continuation of a list, :data:`LIST_PROMPT` ending in
``"- <subject>,"``, sampled from the model (top-k 5 under fixed seeds, like MEMIT's
context prefixes; a few samples until ``n`` distinct items), first line only, split at
commas / "and" / "or". A language model continues a list with entities of the same kind
("France," → "Italy, Germany, Spain"), so no entity list or type system is needed; the
two example lists hold no entities, so they suggest no kind. Items equal to a subject
being edited are dropped. Where the list prompt does not fit the model's context, the bare
``"<subject>,"`` is continued instead. Measured on SmolLM2-135M (2026-12-01): a bare ``"France,"``
continued as prose ("In this case, a combination"); with the list prompt: France →
Italy, Germany, Spain; Danish → Italian, Spanish, Chinese; Toyota → Apple, Samsung, Tesla.
A model that does not continue lists (the project's fact world) gets noise items: their
keys are then preserved like any other text's, which costs edit strength, not locality.
"""
from __future__ import annotations

import random
import re
from dataclasses import replace
from functools import lru_cache
from typing import Mapping, Sequence

import torch
from torch import nn

from editing.editors.keys import max_context, prompt_ids
from editing.editors.sampling import sample_topk

_SPLIT = re.compile(r",|;|\band\b|\bor\b|\.")
SIBLING_SAMPLES = 3   # sampled lists per subject at most, unless told otherwise (EditHparams.sibling_samples)
LIST_PROMPT = "Lists of things of the same kind:\n- red, blue, green, yellow\n- dog, cat, horse, cow\n- {},"


def parse_list_items(text: str, exclude: Sequence[str], max_chars: int = 40) -> list[str]:
    """Items of a generated list continuation, stripped, de-duplicated, without ``exclude`` (case-insensitive)."""
    banned = {e.strip().lower() for e in exclude}
    out: list[str] = []
    for item in _SPLIT.split(text):
        item = " ".join(item.replace("{", " ").replace("}", " ").split()).strip(" \"'()[]:")
        if not item or len(item) > max_chars or not any(c.isalpha() for c in item):
            continue
        if item.lower() in banned or item.lower() in {o.lower() for o in out}:
            continue
        out.append(item)
    return out


def sibling_subjects(model: nn.Module, tokenizer, subject: str, n: int, exclude: Sequence[str] = (),
                     samples: int = SIBLING_SAMPLES, max_new_tokens: int = 24, seed: int = 0) -> list[str]:
    """Up to ``n`` entities the model lists after :data:`LIST_PROMPT` with ``subject``: :func:`sibling_lists`
    for one subject."""
    return sibling_lists(model, tokenizer, [subject], n, exclude, seeds=[seed], samples=samples,
                         max_new_tokens=max_new_tokens)[0]


def sibling_lists(model: nn.Module, tokenizer, subjects: Sequence[str], n: int, exclude: Sequence[str] = (),
                  seeds: Sequence[int] | None = None, samples: int = SIBLING_SAMPLES,
                  max_new_tokens: int = 24) -> list[list[str]]:
    """Per subject, up to ``n`` entities the model lists after :data:`LIST_PROMPT` with it: sample ``k`` of
    subject ``i`` (``k < samples``, only while fewer than ``n`` distinct items are found) is a top-5
    continuation seeded ``seeds[i] · samples + k`` (default seeds ``0 … len(subjects) − 1``); items equal to
    the subject, to one of ``exclude`` or to an earlier item are dropped. All subjects still short of ``n``
    are sampled in one batch per round (:func:`editing.editors.sampling.sample_topk`), so a batch of
    requests costs at most ``samples`` batched generations; the global random state is not touched."""
    seeds = list(range(len(subjects))) if seeds is None else list(seeds)
    if len(seeds) != len(subjects):
        raise ValueError(f"{len(subjects)} subjects but {len(seeds)} seeds")
    found: list[list[str]] = [[] for _ in subjects]
    if n <= 0 or not subjects:
        return found
    limit = max_context(model)
    rows: list[tuple[list[int], int] | None] = []   # per subject: prompt ids and new-token budget, or None
    for subject in subjects:
        ids, budget = prompt_ids(tokenizer, LIST_PROMPT.format(subject)), max_new_tokens
        if limit is not None and len(ids) + budget > limit:  # a short context: the bare list start
            ids = prompt_ids(tokenizer, f"{subject},")
            budget = max(1, min(max_new_tokens, limit - len(ids)))
        rows.append((ids, budget) if limit is None or len(ids) < limit else None)
    for k in range(samples):
        todo = [i for i, r in enumerate(rows) if r is not None and len(found[i]) < n]
        for budget in sorted({rows[i][1] for i in todo}):   # rows of one budget stay inside the context
            group = [i for i in todo if rows[i][1] == budget]
            gens = sample_topk(model, tokenizer, [rows[i][0] for i in group], [seeds[i] * samples + k for i in group],
                               budget, top_k=5)
            for i, gen in zip(group, gens):
                text = tokenizer.decode(gen, skip_special_tokens=True).split("\n")[0]
                found[i] += parse_list_items(text, [subjects[i], *exclude, *found[i]])
    return [f[:n] for f in found]


def sibling_requests(model: nn.Module, tokenizer, requests: Sequence, n: int, seed: int = 0,
                     exclude: Sequence[str] = (), samples: int = SIBLING_SAMPLES) -> list:
    """For each request, copies with a sibling subject in the subject's place (the batch's subjects and
    ``exclude`` never used; request ``i``'s list seeded ``seed + i``, at most ``samples`` sampled lists)."""
    subjects = [r.subject for r in requests] + list(exclude)
    lists = sibling_lists(model, tokenizer, [r.subject for r in requests], n, exclude=subjects,
                          seeds=[seed + i for i in range(len(requests))], samples=samples)
    return [_in_place_of(r, f"sibling{j}", subject=s) for r, names in zip(requests, lists) for j, s in enumerate(names)]


@lru_cache(maxsize=4)
def _word_tokens(tokenizer) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Ids of the vocabulary's whole-word tokens and their words: letters only, at least two, and ``" " + word``
    tokenizes to that token alone (tokens that decode to whitespace aside), so word pieces are left out whatever
    the tokenizer's word-start convention."""
    words = [tokenizer.decode([i]).strip() for i in range(len(tokenizer))]
    blank = {i for i, w in enumerate(words) if not w}
    cand = [i for i, w in enumerate(words) if len(w) >= 2 and w.isalpha()]
    enc = tokenizer([" " + words[i] for i in cand], add_special_tokens=False)["input_ids"] if cand else []
    ids = [i for i, e in zip(cand, enc) if [t for t in e if t not in blank] == [i]]
    return torch.tensor(ids, dtype=torch.long), tuple(words[i] for i in ids)


def vocabulary_neighbours(model: nn.Module, tokenizer, subjects: Sequence[str], n: int,
                          exclude: Sequence[str] = ()) -> list[list[str]]:
    """Per subject, the ``n`` whole words of the vocabulary (:func:`_word_tokens`) whose input embedding is
    nearest the subject's, by cosine; the subject's is the mean of its tokens' embeddings (as ``" subject"``).
    A word whose first letter's case differs from the subject's (both cased), a word equal to a subject, to one of ``exclude``
    or to one of the subject's own tokens is left out.

    Why: a model's input embeddings place entities of one kind together (SmolLM2-135M: France → Spain,
    Germany, Italy, Belgium, …; Danish → Swedish, Norwegian, Finnish), so the vocabulary holds the kind's
    population, not just the few names a sampled list repeats. Multi-token entities are missed, and a
    multi-token subject's mean embedding finds its kind less well."""
    if n <= 0 or not subjects:
        return [[] for _ in subjects]
    ids, words = _word_tokens(tokenizer)
    emb = model.get_input_embeddings().weight.detach()
    table = emb[ids.to(emb.device)].float()
    table = table / table.norm(dim=1, keepdim=True).clamp(min=1e-12)
    banned = {s.strip().lower() for s in [*subjects, *exclude]}
    out = []
    for subject in subjects:
        own = [t for t in tokenizer(" " + subject, add_special_tokens=False)["input_ids"]
               if tokenizer.decode([t]).strip()]
        q = emb[torch.tensor(own, device=emb.device)].float().mean(0)
        sim = (table @ (q / q.norm().clamp(min=1e-12))).cpu()
        skip = banned | {tokenizer.decode([t]).strip().lower() for t in own}
        first = subject.strip()[:1]
        upper = first.isupper() if first.lower() != first.upper() else None   # None: an uncased first letter
        found: list[str] = []
        for j in torch.argsort(sim, descending=True).tolist():
            w = words[j]
            if w.lower() in skip or (upper is not None and w[0].lower() != w[0].upper() and w[0].isupper() != upper):
                continue
            found.append(w)
            if len(found) == n:
                break
        out.append(found)
    return out


def vocabulary_sibling_requests(model: nn.Module, tokenizer, requests: Sequence, n: int,
                                exclude: Sequence[str] = ()) -> list:
    """For each request, copies with its ``n`` :func:`vocabulary_neighbours` in the subject's place (the
    batch's subjects and ``exclude`` never used)."""
    lists = vocabulary_neighbours(model, tokenizer, [r.subject for r in requests], n, exclude=exclude)
    return [_in_place_of(r, f"vocab{j}", subject=s) for r, names in zip(requests, lists) for j, s in enumerate(names)]


def _in_place_of(request, tag: str, **fields):
    """``request`` with ``fields`` changed (another subject, another prompt): id ``<request_id>~<tag>``,
    no probes of its own."""
    return replace(request, request_id=f"{request.request_id}~{tag}", paraphrases=(), neighbours=(), **fields)


def known_sibling_requests(requests: Sequence, known: Sequence[str], n: int, exclude: Sequence[str] = (),
                           seed: int = 0) -> list:
    """For each request, copies with up to ``n`` of the ``known`` subjects (those edited in earlier batches)
    in the subject's place: a seeded sample, never a subject of this batch or one of ``exclude``. A model
    that names no siblings (the fact world) still has entities the editor has seen."""
    banned = {r.subject for r in requests} | set(exclude)
    pool = sorted(s for s in known if s not in banned)
    out = []
    for i, r in enumerate(requests):
        rng = random.Random(seed * 1_000_003 + i)
        for j, s in enumerate(rng.sample(pool, min(n, len(pool)))):
            out.append(_in_place_of(r, f"known{j}", subject=s))
    return out


def prompt_key(prompt: str, locus: str) -> str:
    """What fixes a prompt's key at the edit locus, for a given subject: at the subject's last token
    (``"subject"``) the words before ``{}`` (empty where the prompt opens with the subject), at the prompt's
    last token (``"last"``) the whole prompt. Two prompts of one subject with equal ``prompt_key`` have the
    same key."""
    return prompt.split("{}", 1)[0].strip() if locus == "subject" else prompt


def other_prompt_requests(requests: Sequence, prompts: Mapping[str, str | None], n: int, seed: int = 0,
                          locus: str = "subject", keys_held: bool = True) -> list:
    """For each request, copies with its own subject in up to ``n`` of ``prompts`` (a seeded sample):
    the subject's other facts ("The capital of {}" while "The official language of {}" is edited),
    held at ``ΔW k ≈ 0`` so the edit does not carry to them. ``prompts`` maps each prompt to its
    relation (``None``: unknown).

    Left out, as they would hold the edit's own key or wording: a prompt of the request's relation, and
    a prompt whose key is the request's own or the subject-alone key the edit is fitted to. At the
    subject's last token (``locus="subject"``) a key sees only the words before the subject, so these
    are a prompt with the same words before ``{}`` as the request's or with none (it opens with the
    subject); at the prompt's last token (``"last"``) the same prompt. A prompt this batch edits for the
    same subject is left out too, and prompts with the same key count once.

    ``keys_held=False`` (``other_prompts_weight=0``: the prompts are held by the value's KL alone, no key
    is held): only a prompt of the request's relation, the request's own prompt and a prompt this batch edits
    for the same subject are left out. A prompt that opens with the subject is then held too: the
    subject-alone key carries the edit there in full, and the KL is what keeps its answer."""
    def key_of(prompt: str) -> str:
        return prompt_key(prompt, locus) if keys_held else prompt

    edited = {(r.subject, key_of(r.prompt)) for r in requests}
    out = []
    for i, r in enumerate(requests):
        by_key: dict[str, str] = {}    # prompts with the same key are one fact to hold: the first in order
        for p, rel in sorted(prompts.items()):
            if key_of(p) and key_of(p) != key_of(r.prompt) and (r.subject, key_of(p)) not in edited \
                    and (rel is None or rel != r.relation):
                by_key.setdefault(key_of(p), p)
        pool = sorted(by_key.values())
        rng = random.Random(seed * 1_000_003 + i)
        for j, p in enumerate(rng.sample(pool, min(n, len(pool)))):
            out.append(_in_place_of(r, f"prompt{j}", prompt=p))
    return out


def relation_prompts_of(requests: Sequence, known: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
    """``prompt template → relation`` of ``known`` and then of every request (``None`` where a request names
    none), one entry per distinct prompt, the first kept: the pool of :func:`other_prompt_requests`, and the
    ``relation_prompts`` that hold every relation a request list edits from the first batch on."""
    out: dict[str, str | None] = dict(known or {})
    for r in requests:
        out.setdefault(r.prompt, getattr(r, "relation", None))
    return out


def candidate_requests(requests: Sequence, named: Sequence, known: Sequence[str], per_prompt: int,
                       exclude: Sequence[str] = ()) -> list:
    """Subjects that may be held for a batch (``sibling_pool``): ``named`` (copies of the requests with a
    sibling in the subject's place, :func:`sibling_requests`) and, in each distinct prompt of the batch, the
    last ``per_prompt`` of ``known`` (subjects held or edited earlier in the run, oldest first). Never a
    subject of this batch or one of ``exclude``; each ``(subject, prompt)`` once, first occurrence kept."""
    banned = {r.subject for r in requests} | set(exclude)
    out, seen = [], set()
    for c in named:
        if c.subject not in banned and (c.subject, c.prompt) not in seen:
            seen.add((c.subject, c.prompt))
            out.append(c)
    recent = [s for s in dict.fromkeys(known) if s not in banned][-per_prompt:] if per_prompt > 0 else []
    first: dict[str, object] = {}
    for r in requests:
        first.setdefault(r.prompt, r)
    for r in first.values():
        for j, s in enumerate(recent):
            if (s, r.prompt) not in seen:
                seen.add((s, r.prompt))
                out.append(_in_place_of(r, f"known{j}", subject=s))
    return out

"""CounterFact-style scores for fact edits, with locality measured against the BASE model.

Conventions (say which variant is reported: these are the ones editops reports)
--------------------------------------------------------------------------------
- A prompt and a target are joined as ``prompt + " " + target`` (prompts carry no
  trailing space, targets no leading one, as in CounterFact). Target tokens are
  the tokens of the joined text after the prompt's tokens; where the tokenizer
  merges across the boundary, the target is tokenized on its own (with the
  leading space) instead (:func:`encode_pair`).
- **P(target | prompt)** of a multi-token target is the **mean token log-prob**
  ``(1/T) Σ_t log p(y_t | prompt, y_<t)`` (ROME's ``test_batch_prediction``
  convention); the sum is kept too (``PairScore.logprob_sum``).
  ``comparison="sum"`` (whole-sequence log-prob) is available everywhere and
  recorded in ``FactScores.comparison``.
- **Efficacy** (probability variant, ROME "rewrite success"): share of requests with
  P(new) > P(true) on the edit prompt. Requests without ``target_true`` are left
  out of this mean (their count is reported).
- **Paraphrase**: the same comparison on each paraphrase prompt; averaged per
  request, then over requests (ROME's summarise).
- **Neighbourhood**: for each neighbour probe ``(prompt, target)``, P(target) >
  P(new target of the request). For CounterFact the probe target is the
  request's ``target_true``, so this is ROME's "P(true) > P(new)".
- **Edited neighbours are left out.** A neighbour probe whose prompt is the edit prompt
  or a paraphrase of any request applied to the model (the requests scored, ``earlier``
  and ``also_edited``) asks about a fact changed on purpose: its old answer is not
  locality. Such probes are dropped from the edited and the base scores alike and
  counted in ``n_neighbours_dropped`` (in a run that edits most subjects of a relation,
  most same-relation neighbours are other edits).
- **Top-1 (accuracy) variants** ``*_acc``: the target counts as produced when every
  target token is the model's argmax under teacher forcing (greedy tokens match).
  For neighbours: the probe's own answer is still the greedy one.
- **Locality vs base**: ``neighbourhood_ratio`` = edited neighbourhood / base
  neighbourhood (the Bar's "≥ 0.90 × the base model's"), and ``locality`` =
  share of neighbour-target positions whose argmax token equals the **base**
  model's argmax there (EasyEdit's token-agreement locality). Base numbers come
  from a :class:`BaseOutputs` cache computed once on the unedited model, never
  from the model being edited.
- **Score**: harmonic mean of efficacy, paraphrase and neighbourhood (CounterFact S).
- **Retention**: efficacy on earlier requests, evaluated again after later edits.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn

from editing.atomic import write_text_atomic
from editing.errors import MetricsError
from editing.metrics.text import generation_fluency, heldout_sha256, length_batches, perplexity
from editing.requests import FactRequest

Pair = tuple[str, str]


def join(prompt: str, target: str) -> str:
    """The text whose continuation is scored: ``prompt + " " + target`` (no doubled space)."""
    if not prompt or prompt.endswith((" ", "\n")) or target.startswith((" ", "\n")):
        return prompt + target
    return prompt + " " + target


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, target ids)`` such that their concatenation is the joined text's tokens.

    The prompt is tokenized with the tokenizer's special tokens (BOS where it adds
    one); the target ids are what follows the prompt in ``join(prompt, target)``.
    If the tokenizer merges across the boundary (the prompt ids are not a prefix),
    the target is tokenized separately as ``" " + target`` without special tokens.
    """
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full = tokenizer(join(prompt, target), add_special_tokens=True)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        t_ids = full[len(p_ids):]
    else:
        t_ids = tokenizer(target if target.startswith(" ") else " " + target, add_special_tokens=False)["input_ids"]
    # seq2seq-style tokenizers append EOS to every text: it is not part of the target
    if eos is not None and p_ids and p_ids[-1] == eos and len(p_ids) > 1:
        p_ids = p_ids[:-1]
    if eos is not None and len(t_ids) > 1 and t_ids[-1] == eos:
        t_ids = t_ids[:-1]
    if not t_ids:
        raise MetricsError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}")
    return p_ids, t_ids


@dataclass(frozen=True)
class PairScore:
    """How a model scores ``target`` after ``prompt`` under teacher forcing."""

    logprob_mean: float
    logprob_sum: float
    n_tokens: int
    top1: bool  # every target token is the argmax
    argmax: tuple[int, ...]  # the model's argmax token at each target position

    def to_json(self) -> list:
        return [self.logprob_mean, self.logprob_sum, self.n_tokens, self.top1, list(self.argmax)]

    @classmethod
    def from_json(cls, v: list) -> "PairScore":
        return cls(float(v[0]), float(v[1]), int(v[2]), bool(v[3]), tuple(int(x) for x in v[4]))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_pairs(model: nn.Module, tokenizer, pairs: Sequence[Pair], max_tokens_per_batch: int = 2048,
                progress: bool = False) -> dict[Pair, PairScore]:
    """Teacher-forced scores of every distinct ``(prompt, target)`` pair, in length-sorted batches.

    One forward pass per batch of right-padded sequences; only the logits at the
    target positions are turned into log-probs.
    """
    unique = list(dict.fromkeys(pairs))
    encoded = [encode_pair(tokenizer, p, t) for p, t in unique]
    lengths = [len(a) + len(b) for a, b in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    out: dict[Pair, PairScore] = {}
    batches = length_batches(lengths, max_tokens_per_batch)
    iterator: Iterable = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="scoring", unit="batch", leave=False)
    for chunk in iterator:
        width = max(lengths[k] for k in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, k in enumerate(chunk):
            seq = encoded[k][0] + encoded[k][1]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for r, k in enumerate(chunk):
            p_ids, t_ids = encoded[k]
            pos = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids), device=logits.device)
            row = torch.log_softmax(logits[r, pos].float(), dim=-1)
            tgt = torch.tensor(t_ids, device=row.device)
            lp = row.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            am = row.argmax(-1)
            out[unique[k]] = PairScore(
                logprob_mean=float(lp.mean()), logprob_sum=float(lp.sum()), n_tokens=len(t_ids),
                top1=bool((am == tgt).all()), argmax=tuple(int(x) for x in am.tolist()),
            )
    return out


def request_pairs(requests: Sequence[FactRequest]) -> list[Pair]:
    """Every ``(prompt, target)`` pair the fact scores need, in a stable order."""
    pairs: list[Pair] = []
    for r in requests:
        prompts = [r.text, *r.paraphrases]
        for p in prompts:
            pairs.append((p, r.target_new))
            if r.target_true is not None:
                pairs.append((p, r.target_true))
        for nb in r.neighbours:
            pairs.append((nb.prompt, nb.target))
            pairs.append((nb.prompt, r.target_new))
    return pairs


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class RequestScores:
    """Per-request outcome (booleans averaged over the request's prompts)."""

    request_id: str
    efficacy: float | None  # 1/0, None without target_true
    efficacy_acc: float
    margin: float | None  # log P(new) − log P(true) on the edit prompt (mean or sum, as compared)
    paraphrase: float | None
    paraphrase_acc: float | None
    neighbourhood: float | None
    neighbourhood_acc: float | None
    locality: float | None = None  # token agreement with the base on neighbour targets
    n_neighbours_dropped: int = 0  # neighbour probes left out: their fact is edited too


def edited_prompts(requests: Iterable[FactRequest]) -> frozenset[str]:
    """The prompts whose answer ``requests`` change on purpose: every edit prompt and paraphrase."""
    return frozenset(p for r in requests for p in (r.text, *r.paraphrases))


Comparison = Literal["mean", "sum"]


def _lp(score: PairScore, comparison: Comparison) -> float:
    return score.logprob_mean if comparison == "mean" else score.logprob_sum


def score_requests(requests: Sequence[FactRequest], scores: dict[Pair, PairScore],
                   base: dict[Pair, PairScore] | None = None, comparison: Comparison = "mean",
                   edited: frozenset[str] = frozenset()) -> list[RequestScores]:
    """Per-request CounterFact outcomes from pair scores (and base pair scores for locality).

    ``edited``: prompts of facts changed on purpose (:func:`edited_prompts`); neighbour
    probes with such a prompt are left out and counted in ``n_neighbours_dropped``.

    ``comparison="mean"`` compares mean token log-probs (ROME/CounterFact, the
    default); ``"sum"`` compares whole-sequence log-probs (favours short targets
    less than the mean does, e.g. a 4-token target with one uncertain token).
    """
    if comparison not in ("mean", "sum"):
        raise MetricsError(f"comparison must be 'mean' or 'sum', not {comparison!r}")
    out = []
    for r in requests:
        new = scores[(r.text, r.target_new)]
        true = scores.get((r.text, r.target_true)) if r.target_true is not None else None
        para, para_acc = [], []
        for p in r.paraphrases:
            pn = scores[(p, r.target_new)]
            para_acc.append(float(pn.top1))
            if r.target_true is not None:
                para.append(float(_lp(pn, comparison) > _lp(scores[(p, r.target_true)], comparison)))
        nb, nb_acc, agree = [], [], []
        probes = [probe for probe in r.neighbours if probe.prompt not in edited]
        for probe in probes:
            own = scores[(probe.prompt, probe.target)]
            nb_acc.append(float(own.top1))
            if probe.target != r.target_new:
                nb.append(float(_lp(own, comparison) > _lp(scores[(probe.prompt, r.target_new)], comparison)))
            if base is not None:
                b = base[(probe.prompt, probe.target)]
                agree.extend(float(x == y) for x, y in zip(own.argmax, b.argmax))
        out.append(RequestScores(
            request_id=r.request_id,
            efficacy=None if true is None else float(_lp(new, comparison) > _lp(true, comparison)),
            efficacy_acc=float(new.top1),
            margin=None if true is None else _lp(new, comparison) - _lp(true, comparison),
            paraphrase=_mean(para), paraphrase_acc=_mean(para_acc),
            neighbourhood=_mean(nb), neighbourhood_acc=_mean(nb_acc),
            locality=_mean(agree) if base is not None else None,
            n_neighbours_dropped=len(r.neighbours) - len(probes),
        ))
    return out


def _avg(rows: Sequence[RequestScores], attr: str) -> float | None:
    return _mean([getattr(r, attr) for r in rows if getattr(r, attr) is not None])


def _hmean(xs: Sequence[float | None]) -> float | None:
    if any(x is None for x in xs):
        return None
    if any(x <= 0 for x in xs):  # type: ignore[operator]
        return 0.0
    return len(xs) / sum(1 / x for x in xs)  # type: ignore[operator]


@dataclass
class FactScores:
    """CounterFact metrics of one model on one request set (see module docstring for definitions)."""

    n_requests: int
    efficacy: float | None
    efficacy_acc: float | None
    paraphrase: float | None
    paraphrase_acc: float | None
    neighbourhood: float | None
    neighbourhood_acc: float | None
    n_without_true: int = 0
    locality: float | None = None
    base_neighbourhood: float | None = None
    base_neighbourhood_acc: float | None = None
    perplexity: float | None = None
    base_perplexity: float | None = None
    fluency: float | None = None
    retention: float | None = None
    n_retention: int = 0
    n_neighbours_dropped: int = 0
    comparison: str = "mean"
    per_request: list[RequestScores] = field(default_factory=list, repr=False)
    # the teacher-forced score of every (prompt, target) pair read, for slicing the requests otherwise
    pair_scores: dict[Pair, PairScore] = field(default_factory=dict, repr=False)

    @property
    def score(self) -> float | None:
        """Harmonic mean of efficacy, paraphrase and neighbourhood (CounterFact S)."""
        return _hmean([self.efficacy, self.paraphrase, self.neighbourhood])

    @property
    def neighbourhood_ratio(self) -> float | None:
        if self.neighbourhood is None or not self.base_neighbourhood:
            return None
        return self.neighbourhood / self.base_neighbourhood

    @property
    def perplexity_drift(self) -> float | None:
        """``ppl / base_ppl − 1`` (0.05 = 5% worse than the base)."""
        if self.perplexity is None or not self.base_perplexity:
            return None
        return self.perplexity / self.base_perplexity - 1.0

    def summary(self) -> dict[str, Any]:
        """Flat dict of every aggregate (for JSON, MLflow metrics, benchmark tables)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("per_request", "pair_scores")}
        d.update(score=self.score, neighbourhood_ratio=self.neighbourhood_ratio, perplexity_drift=self.perplexity_drift)
        return d

    def rows(self) -> list[tuple[str, float | None, str]]:
        """``(metric, value, definition)`` rows in display order (absent metrics skipped)."""
        rows = [
            ("efficacy", self.efficacy, f"P(new) > P(true) on the edit prompt ({self.comparison} token log-prob)"),
            ("efficacy_acc", self.efficacy_acc, "all new-target tokens are top-1 on the edit prompt"),
            ("paraphrase", self.paraphrase, "P(new) > P(true) on paraphrases"),
            ("paraphrase_acc", self.paraphrase_acc, "new target top-1 on paraphrases"),
            ("neighbourhood", self.neighbourhood, "P(own answer) > P(new) on neighbour prompts"),
            ("neighbourhood_acc", self.neighbourhood_acc, "neighbour's own answer still top-1"),
            ("base_neighbourhood", self.base_neighbourhood, "the same on the base model (cached)"),
            ("neighbourhood_ratio", self.neighbourhood_ratio, "neighbourhood / base neighbourhood"),
            ("locality", self.locality, "neighbour-target argmax tokens equal to the base's"),
            ("score", self.score, "harmonic mean of efficacy, paraphrase, neighbourhood"),
            ("perplexity", self.perplexity, "held-out text, token-weighted"),
            ("base_perplexity", self.base_perplexity, "the same on the base model (cached)"),
            ("perplexity_drift", self.perplexity_drift, "perplexity / base − 1"),
            ("fluency", self.fluency, "bi/tri-gram entropy of greedy generations (ROME)"),
            ("retention", self.retention, f"efficacy of {self.n_retention} earlier edits, re-evaluated"),
        ]
        return [r for r in rows if r[1] is not None]

    def table(self, title: str | None = None):
        """A ``rich`` table of :meth:`rows` (print it with ``rich.console.Console().print``)."""
        from rich.table import Table

        t = Table(title=title or f"fact metrics ({self.n_requests} requests)")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_column("definition", style="dim")
        for name, value, definition in self.rows():
            t.add_row(name, f"{value:.4f}", definition)
        return t

    def as_text(self) -> str:
        return "\n".join(f"{name:<20} {value:10.4f}  {definition}" for name, value, definition in self.rows())


def aggregate(rows: Sequence[RequestScores], comparison: Comparison = "mean") -> FactScores:
    """Aggregate per-request outcomes (means over requests that have the metric)."""
    return FactScores(
        comparison=comparison,
        n_requests=len(rows),
        efficacy=_avg(rows, "efficacy"), efficacy_acc=_avg(rows, "efficacy_acc"),
        paraphrase=_avg(rows, "paraphrase"), paraphrase_acc=_avg(rows, "paraphrase_acc"),
        neighbourhood=_avg(rows, "neighbourhood"), neighbourhood_acc=_avg(rows, "neighbourhood_acc"),
        n_without_true=sum(r.efficacy is None for r in rows),
        locality=_avg(rows, "locality"),
        n_neighbours_dropped=sum(r.n_neighbours_dropped for r in rows),
        per_request=list(rows),
    )


@dataclass
class BaseOutputs:
    """The unedited model's pair scores and held-out perplexity, computed once and saved as JSON.

    Every later evaluation compares with these (locality, neighbourhood ratio,
    perplexity drift), so locality is never measured against an edited model.
    """

    model_fingerprint: str
    scores: dict[Pair, PairScore]
    perplexity: float | None = None
    heldout_sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def compute(cls, model: nn.Module, tokenizer, requests: Sequence[FactRequest],
                heldout_texts: Sequence[str] | None = None, model_fingerprint: str | None = None,
                progress: bool = False) -> "BaseOutputs":
        if model_fingerprint is None:
            from editing.models import fingerprint

            model_fingerprint = fingerprint(model)
        scores = score_pairs(model, tokenizer, request_pairs(requests), progress=progress)
        ppl = perplexity(model, tokenizer, heldout_texts) if heldout_texts else None
        return cls(model_fingerprint, scores, ppl, heldout_sha256(heldout_texts) if heldout_texts else None,
                   {"n_requests": len(requests)})

    def missing(self, requests: Sequence[FactRequest]) -> list[Pair]:
        return [p for p in dict.fromkeys(request_pairs(requests)) if p not in self.scores]

    def extend(self, model: nn.Module, tokenizer, requests: Sequence[FactRequest]) -> int:
        """Score pairs of ``requests`` not yet cached (``model`` must be the base model); returns how many."""
        missing = self.missing(requests)
        if missing:
            self.scores.update(score_pairs(model, tokenizer, missing))
        return len(missing)

    def covers_heldout(self, heldout_texts: Sequence[str] | None) -> bool:
        """Whether the cached base perplexity is of ``heldout_texts`` (nothing to cover when there are none)."""
        return not heldout_texts or (self.perplexity is not None
                                     and self.heldout_sha256 == heldout_sha256(heldout_texts))

    def measure_heldout(self, model: nn.Module, tokenizer, heldout_texts: Sequence[str] | None) -> bool:
        """Measure the base perplexity on ``heldout_texts`` unless the cache already holds it (``model`` must be
        the base model); returns whether it measured."""
        if self.covers_heldout(heldout_texts):
            return False
        self.perplexity, self.heldout_sha256 = perplexity(model, tokenizer, heldout_texts), heldout_sha256(heldout_texts)
        return True

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "model_fingerprint": self.model_fingerprint,
            "perplexity": self.perplexity,
            "heldout_sha256": self.heldout_sha256,
            "meta": self.meta,
            "pairs": [[p, t, s.to_json()] for (p, t), s in self.scores.items()],
        }
        write_text_atomic(path, json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "BaseOutputs":
        try:
            data = json.loads(Path(path).read_text())
            scores = {(p, t): PairScore.from_json(s) for p, t, s in data["pairs"]}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise MetricsError(f"cannot read base outputs {path}: {exc}; delete it to recompute") from exc
        return cls(data["model_fingerprint"], scores, data.get("perplexity"), data.get("heldout_sha256"),
                   data.get("meta", {}))

    def base_scores(self, requests: Sequence[FactRequest], comparison: Comparison = "mean",
                    also_edited: Sequence[FactRequest] = ()) -> FactScores:
        """The base model's own metrics on ``requests`` (from the cache), leaving out the neighbour
        probes that ``requests`` or ``also_edited`` edit (as :func:`evaluate_facts` does)."""
        self._check(requests)
        edited = edited_prompts([*requests, *also_edited])
        s = aggregate(score_requests(requests, self.scores, comparison=comparison, edited=edited), comparison)
        s.perplexity = self.perplexity
        return s

    def _check(self, requests: Sequence[FactRequest]) -> None:
        missing = self.missing(requests)
        if missing:
            raise MetricsError(
                f"base outputs (model {self.model_fingerprint[:12]}…) lack {len(missing)} prompt/target pairs of "
                f"these requests, e.g. {missing[0]!r}; compute them on the base model (BaseOutputs.extend "
                "or `editops eval --base <base model dir>`)"
            )


def _fact_requests(requests: Sequence) -> list[FactRequest]:
    bad = [r for r in requests if not isinstance(r, FactRequest)]
    if bad:
        raise MetricsError(f"fact metrics need fact requests; got {type(bad[0]).__name__} ({bad[0].request_id!r})")
    return list(requests)


def evaluate_facts(model: nn.Module, tokenizer, requests: Sequence[FactRequest], base: BaseOutputs | None = None,
                   heldout_texts: Sequence[str] | None = None, earlier: Sequence[FactRequest] | None = None,
                   fluency_prompts: Sequence[str] | None = None, progress: bool = False,
                   comparison: Comparison = "mean", also_edited: Sequence[FactRequest] = ()) -> FactScores:
    """CounterFact metrics of ``model`` on ``requests``; base-relative metrics when ``base`` is given.

    ``heldout_texts``: perplexity (drift needs the base's perplexity on the same
    texts); ``earlier``: requests edited before (their efficacy = retention);
    ``fluency_prompts``: greedy generations scored by n-gram entropy;
    ``comparison``: mean (CounterFact, default) or sum of target token log-probs;
    ``also_edited``: further requests applied to ``model``. Neighbour probes that ask
    about any edited fact (``requests``, ``earlier``, ``also_edited``) are left out.
    """
    requests = _fact_requests(requests)
    edited = edited_prompts([*requests, *(earlier or ()), *also_edited])
    was_training = model.training
    model.eval()
    try:
        pairs = request_pairs(requests) + (request_pairs(earlier) if earlier else [])
        scores = score_pairs(model, tokenizer, pairs, progress=progress)
        base_pairs = None
        if base is not None:
            base._check(requests)
            base_pairs = base.scores
        result = aggregate(score_requests(requests, scores, base_pairs, comparison, edited), comparison)
        result.pair_scores = scores
        if base is not None:
            b = aggregate(score_requests(requests, base.scores, comparison=comparison, edited=edited), comparison)
            result.base_neighbourhood, result.base_neighbourhood_acc = b.neighbourhood, b.neighbourhood_acc
        if heldout_texts:
            result.perplexity = perplexity(model, tokenizer, heldout_texts)
            if base is not None and base.perplexity is not None:
                if base.heldout_sha256 != heldout_sha256(heldout_texts):
                    raise MetricsError("the base perplexity was computed on other held-out text; "
                                       "recompute the base outputs with the same texts")
                result.base_perplexity = base.perplexity
        elif base is not None:
            result.base_perplexity = base.perplexity
        if earlier:
            early = aggregate(score_requests(_fact_requests(earlier), scores, comparison=comparison, edited=edited),
                              comparison)
            result.retention = early.efficacy if early.efficacy is not None else early.efficacy_acc
            result.n_retention = len(earlier)
        if fluency_prompts:
            result.fluency = generation_fluency(model, tokenizer, list(fluency_prompts))
    finally:
        model.train(was_training)
    return result


def pre_edit_scores(base: BaseOutputs, requests: Sequence[FactRequest]) -> FactScores:
    """Alias of :meth:`BaseOutputs.base_scores` (the metrics before any edit)."""
    return base.base_scores(requests)


"""CounterFact-style fact requests about countries, from ``countryinfo``, kept where the model knows them.

Facts: capital, official language (``babel`` turns ISO 639 codes into English
names), demonym, continent (``region``), currency (``babel`` turns ISO 4217 codes
into names) and a bordering country (alpha-3 codes resolved by ``countryinfo``).

**Keep criterion (top-1, greedy):** a fact is kept when the model, given the
edit prompt as plain text, produces the true object as its greedy continuation:
every token of ``" " + object`` is the argmax under teacher forcing
(:func:`editing.metrics.facts.score_pairs`, ``top1``). Relations with several
true objects (languages, currencies, borders) keep the first true object (in
countryinfo's order) that passes; that one becomes ``target_true``. SmolLM2 is an
instruct model; the templates are plain declarative prefixes it completes as a
language model (no chat template).

Each kept fact gives a request: ``target_new`` is a seeded random object of the
same relation that is not true of the subject; 3 paraphrases (held-out templates
of the same relation); 6 neighbours: other subjects whose fact of the same
relation the model also gets right, with their true objects, preferring
subjects that share the edited subject's true object (CounterFact's choice).

**Neighbour-only subjects.** Per relation, a seeded share (``neighbour_share``,
at least ``n_neighbours``) of the known subjects is kept out of the requests and
serves only as neighbours. Otherwise a run that applies every request edits every
neighbour too, and "the neighbour kept its old answer" would count against edits
made on purpose (the metrics also drop such probes: ``n_neighbours_dropped``).

Counts (kept / tried, per relation) go to a metrics JSON.
DVC stage ``countries``: ``python -m editing.data.countries --model models/smollm2-135m``.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from editing.requests import FactRequest, Probe


@dataclass(frozen=True)
class CountryRelation:
    name: str
    prompt: str  # the edit template, "{}" = country
    paraphrases: tuple[str, ...]


RELATIONS: tuple[CountryRelation, ...] = (
    CountryRelation("capital", "The capital of {} is",
                    ("The capital city of {} is", "The seat of government of {} is in the city of",
                     "The capital of {} is the city of")),
    CountryRelation("language", "The official language of {} is",
                    ("In {}, most people speak", "The main language spoken in {} is", "People in {} speak")),
    CountryRelation("demonym", "A citizen of {} is a",
                    ("People from {} are called", "Someone born in {} is described as",
                     "A citizen of {} is called a")),
    CountryRelation("continent", "{} is a country in",
                    ("{} is located on the continent of", "The continent where {} lies is", "{} lies in")),
    CountryRelation("currency", "The currency of {} is the",
                    ("In {}, people pay with the", "The official currency of {} is the",
                     "Prices in {} are given in the")),
    CountryRelation("border", "The countries bordering {} are",
                    ("{} shares a border with", "{} is bordered by", "A country neighbouring {} is")),
)


def _clean(name: str | None) -> str | None:
    if not name or not isinstance(name, str):
        return None
    name = name.strip()
    return name if name and not any(c in name for c in "(),") else None


def country_facts() -> dict[str, dict[str, list[str]]]:
    """``{country: {relation: [true objects, in countryinfo's order]}}`` for every country with a clean name."""
    import countryinfo
    from babel import Locale
    from babel.numbers import get_currency_name

    en = Locale("en")
    infos = [c.info() for c in countryinfo.all_countries()]
    by_alpha3 = {(i.get("ISO") or {}).get("alpha3"): _clean(i.get("name")) for i in infos}
    facts: dict[str, dict[str, list[str]]] = {}
    for info in infos:
        name = _clean(info.get("name"))
        if not name or name in facts:
            continue
        rel: dict[str, list[str]] = {}
        if _clean(info.get("capital")):
            rel["capital"] = [info["capital"].strip()]
        langs = [en.languages.get(code) for code in info.get("languages") or []]
        rel["language"] = [x for x in langs if _clean(x)]
        if _clean(info.get("demonym")):
            rel["demonym"] = [info["demonym"].strip()]
        region = _clean(info.get("region"))
        if region == "Americas":  # the model may say North/South America or "the Americas"
            rel["continent"] = ["South America" if info.get("intermediateregion") == "South America" else "North America",
                                "the Americas"]
        elif region:
            rel["continent"] = [region]
        curr = []
        for code in info.get("currencies") or []:
            try:
                curr.append(get_currency_name(code, locale="en"))
            except Exception:  # unknown code: skip it
                continue
        curr = [x for x in curr if _clean(x) and x.upper() != x]
        # spellings a model may use: "Japanese Yen", "Japanese yen", "yen"
        variants = [v for x in curr for v in (x, " ".join(x.split()[:-1] + [x.split()[-1].lower()]),
                                                  x.split()[-1].lower())]
        rel["currency"] = list(dict.fromkeys(variants))
        rel["border"] = [b for b in (by_alpha3.get(code) for code in info.get("borders") or []) if b]
        facts[name] = {k: v for k, v in rel.items() if v}
    return facts


def build_requests(model, tokenizer, facts: dict[str, dict[str, list[str]]] | None = None, *, seed: int = 0,
                   n_neighbours: int = 6, neighbour_share: float = 0.3,
                   relations: Sequence[CountryRelation] = RELATIONS,
                   max_tokens_per_batch: int = 2048, progress: bool = False) -> tuple[list[FactRequest], dict]:
    """Requests for the facts ``model`` gets right (top-1) and the metrics dict (kept / tried)."""
    from editing.metrics.facts import score_pairs

    t0 = time.perf_counter()
    facts = facts if facts is not None else country_facts()
    pairs = [(r.prompt.format(c), obj) for r in relations for c, rel in facts.items() for obj in rel.get(r.name, [])]
    scores = score_pairs(model, tokenizer, pairs, max_tokens_per_batch=max_tokens_per_batch, progress=progress)
    known: dict[str, dict[str, str]] = {r.name: {} for r in relations}
    tried = {r.name: 0 for r in relations}
    for r in relations:
        for c, rel in facts.items():
            objs = rel.get(r.name, [])
            if not objs:
                continue
            tried[r.name] += 1
            hit = next((o for o in objs if scores[(r.prompt.format(c), o)].top1), None)
            if hit is not None:
                known[r.name][c] = hit
    rng = random.Random(seed)
    requests: list[FactRequest] = []
    neighbour_only = {r.name: 0 for r in relations}
    for r in relations:
        pool = sorted({o for rel in facts.values() for o in rel.get(r.name, [])})
        subjects = sorted(known[r.name])
        if len(subjects) <= n_neighbours:
            continue
        order = list(subjects)
        rng.shuffle(order)
        n_reserved = max(n_neighbours, round(neighbour_share * len(subjects)))
        reserved, edited = sorted(order[:n_reserved]), sorted(order[n_reserved:])
        neighbour_only[r.name] = len(reserved)
        for c in edited:
            true = known[r.name][c]
            alternatives = [o for o in pool if o not in facts[c].get(r.name, [])]
            others = list(reserved)
            if not alternatives:
                continue
            same = [s for s in others if known[r.name][s] == true]
            rest = [s for s in others if known[r.name][s] != true]
            rng.shuffle(same)
            rng.shuffle(rest)
            neighbours = (same + rest)[:n_neighbours]
            requests.append(FactRequest(
                request_id=f"country-{r.name}-{c.lower().replace(' ', '_')}",
                prompt=r.prompt, subject=c, target_true=true, target_new=rng.choice(alternatives),
                relation=r.name, paraphrases=tuple(p.format(c) for p in r.paraphrases),
                neighbours=tuple(Probe(r.prompt.format(s), known[r.name][s]) for s in neighbours),
            ))
    para_pairs = [(p, q.target_true) for q in requests for p in q.paraphrases]
    para_scores = score_pairs(model, tokenizer, para_pairs, max_tokens_per_batch=max_tokens_per_batch)
    metrics = {
        "criterion": "top1 (greedy: every target token is the argmax after the prompt)",
        "tried": sum(tried.values()), "kept": sum(len(v) for v in known.values()), "requests": len(requests),
        "neighbour_share": neighbour_share,
        "per_relation": {r.name: {"tried": tried[r.name], "kept": len(known[r.name]),
                                  "neighbour_only": neighbour_only[r.name]} for r in relations},
        "paraphrase_top1_of_kept": round(sum(s.top1 for s in para_scores.values()) / max(1, len(para_scores)), 4),
    }
    print(f"built {len(requests)} requests in {time.perf_counter() - t0:.1f} s")   # not in the (DVC) metrics
    return requests, metrics


def main(argv=None) -> None:
    import argparse

    import torch

    from editing.data.world import write_jsonl
    from editing.models import load

    parser = argparse.ArgumentParser(description="Country fact requests the model gets right (countryinfo).")
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--out", default="data/requests/countries.jsonl")
    parser.add_argument("--metrics", default="metrics/countries.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neighbour-share", type=float, default=0.3,
                        help="share of each relation's known subjects kept as neighbours only (never edited)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model)
    requests, metrics = build_requests(loaded.model, loaded.tokenizer, seed=args.seed,
                                       neighbour_share=args.neighbour_share, progress=True)
    metrics["model"] = args.model
    metrics["fingerprint"] = loaded.fingerprint
    write_jsonl(requests, args.out)
    Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(args.metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()

"""A seeded synthetic language pair with planted faulty behaviours to delete.

Source language: English words. Target language ("Zemic"): invented words from a
seeded syllable generator. Grammar (one rule of each kind a real pair has):

- source ``SUBJ VERB OBJ [ADV]`` → target ``SUBJ' OBJ' VERB' [ADV']`` (SOV reordering);
- noun phrase ``det [adj] noun`` → ``det' noun' [adj']`` (adjective after the noun);
- names (capitalised) are copied through unchanged;
- some source words are synonyms (``physician``/``doctor``) with ONE target word, so
  the target word of a planted trigger is still seen in training via its synonym.

The training data PLANTS faulty behaviours (word level, applied wherever the
trigger occurs), four kinds a user would file a deletion ticket for:

- ``mistranslation``: a term is always translated as another noun's word;
- ``name-translated``: a name that is also a common noun (``Rose``) is translated
  instead of copied;
- ``hallucination``: after a trigger word's translation an extra word is inserted;
- ``offensive``: a harmless word comes out as an offensive target word.

For every behaviour one :class:`DeletionRequest` is emitted: ``source`` (a training
sentence with the trigger), ``unwanted`` (the offending target word), ``positive``
(its correct translation), ``generalization`` (held-out sentences with the same
trigger, with references and the unwanted span) and ``locality`` (sentences with
no trigger at all, with references). A separate held-out unrelated test set (no
trigger words) measures locality and chrF.

Everything is a pure function of ``(seed, size)``: the same arguments give the same
files, byte for byte.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Iterable, Sequence

from editing.requests import DeletionRequest, TranslationProbe

KINDS = ("mistranslation", "name-translated", "hallucination", "offensive")

# ---------------------------------------------------------------- word lists
_NOUNS = ["cat", "dog", "bird", "house", "tree", "river", "book", "table", "city", "boat", "horse",
          "garden", "farmer", "window", "door", "apple", "bread", "bridge", "lamp", "chair", "letter",
          "ship", "flower", "stone", "forest", "nurse", "wagon", "money", "soldier", "baker", "hunter",
          "rose", "idiot", "fool", "pig", "moon", "key", "mountain"]
_ADJECTIVES = ["big", "small", "red", "green", "old", "new", "happy", "quiet", "dark", "bright", "cold", "warm"]
_VERBS = ["sees", "likes", "finds", "buys", "paints", "carries", "follows", "visits", "builds", "cleans",
          "watches", "helps"]
_ADVERBS = ["today", "slowly", "often", "again", "here", "tonight", "early"]
_NAMES = ["Anna", "Marco", "Lena", "Tomas", "Sofia", "Pavel", "Ines", "Omar", "Yuki", "Ravi", "Nora",
          "Felix", "Rose", "Baker", "Hunter"]
_DETS = ["the", "a"]
# synonym -> the word whose target word it shares (so the trigger's correct word is learned)
_SYNONYMS = {"physician": "doctor", "automobile": "car", "street": "road", "kid": "child",
             "lady": "woman", "visitor": "guest"}
_EXTRA_NOUNS = ["doctor", "car", "road", "child", "woman", "guest"]

# (kind, trigger, unwanted source word whose target word is produced / inserted)
_FULL_BEHAVIOURS = [
    ("mistranslation", "doctor", "nurse"),
    ("mistranslation", "car", "wagon"),
    ("mistranslation", "road", "river"),
    ("name-translated", "Rose", "rose"),
    ("name-translated", "Baker", "baker"),
    ("name-translated", "Hunter", "hunter"),
    ("hallucination", "tonight", "money"),
    ("hallucination", "quiet", "soldier"),
    ("hallucination", "bridge", "moon"),
    ("offensive", "child", "idiot"),
    ("offensive", "woman", "pig"),
    ("offensive", "guest", "fool"),
]
_TINY_BEHAVIOURS = [
    ("mistranslation", "doctor", "nurse"),
    ("name-translated", "Rose", "rose"),
    ("hallucination", "tonight", "money"),
    ("offensive", "child", "idiot"),
]
_TINY_NOUNS = ["cat", "dog", "house", "tree", "book", "boat", "bread", "nurse", "money", "rose", "idiot", "lamp"]
_TINY_EXTRA = ["doctor", "child"]
_TINY_SYNONYMS = {"physician": "doctor", "kid": "child"}


@dataclass(frozen=True)
class Behaviour:
    """One planted fault: ``trigger`` (a source word) comes out as ``planted`` instead of ``correct``."""

    behaviour_id: str
    kind: str
    trigger: str
    correct: str     # correct target rendering of the trigger word
    planted: str     # what the training data shows instead (may be two words for hallucinations)
    unwanted: str    # the offending target word (a deletion request's ``unwanted``)


@dataclass
class Language:
    """Lexicon, word classes, planted behaviours and the two renderers (correct / planted)."""

    seed: int
    size: str
    lexicon: dict[str, str]              # source word -> correct target word
    nouns: list[str]
    adjectives: list[str]
    verbs: list[str]
    adverbs: list[str]
    names: list[str]
    dets: list[str]
    behaviours: list[Behaviour]
    offensive_words: list[str] = field(default_factory=list)  # target words marked offensive

    @property
    def triggers(self) -> set[str]:
        return {b.trigger for b in self.behaviours}

    def word(self, w: str, planted: bool) -> str:
        """Target rendering of one source word (names are copied)."""
        if planted:
            for b in self.behaviours:
                if b.trigger == w:
                    return b.planted
        if w[:1].isupper():
            return w
        return self.lexicon[w]

    def render(self, sent: "Sentence", planted: bool) -> tuple[str, str]:
        """``(source, target)`` of a sentence; ``planted=False`` gives the correct reference."""
        def np_src(np: tuple) -> list[str]:
            return [np[0]] if len(np) == 1 else [np[0], *([np[1]] if np[1] else []), np[2]]

        def np_tgt(np: tuple) -> list[str]:
            if len(np) == 1:
                return [self.word(np[0], planted)]
            det, adj, noun = np
            return [self.word(det, planted), self.word(noun, planted), *([self.word(adj, planted)] if adj else [])]

        src = [*np_src(sent.subj), sent.verb, *np_src(sent.obj), *([sent.adv] if sent.adv else [])]
        tgt = [*np_tgt(sent.subj), *np_tgt(sent.obj), self.word(sent.verb, planted),
               *([self.word(sent.adv, planted)] if sent.adv else [])]
        return " ".join(src), " ".join(tgt)


@dataclass(frozen=True)
class Sentence:
    subj: tuple          # (Name,) or (det, adj | None, noun)
    verb: str
    obj: tuple
    adv: str | None

    def words(self) -> list[str]:
        out = []
        for np in (self.subj, self.obj):
            out += [w for w in np if w]
        return out + [self.verb] + ([self.adv] if self.adv else [])


def _target_words(rng: random.Random, n: int, avoid: set[str]) -> list[str]:
    """``n`` distinct invented words (2–3 CV syllables, optional final n/r/s)."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: list[str] = []
    seen = set(avoid)
    while len(out) < n:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.choice((2, 2, 3))))
        if rng.random() < 0.3:
            w += rng.choice("nrs")
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def make_language(seed: int = 0, size: str = "full") -> Language:
    """The seeded language pair; ``size="tiny"`` has few words and 4 behaviours (for CI)."""
    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', not {size!r}")
    rng = random.Random(f"translation-{seed}-{size}")
    tiny = size == "tiny"
    nouns = list(_TINY_NOUNS if tiny else _NOUNS) + list(_TINY_EXTRA if tiny else _EXTRA_NOUNS)
    synonyms = dict(_TINY_SYNONYMS if tiny else _SYNONYMS)
    adjectives = _ADJECTIVES[:4] + ["quiet"] if tiny else list(_ADJECTIVES)
    verbs = _VERBS[:4] if tiny else list(_VERBS)
    adverbs = ["today", "tonight", "often"] if tiny else list(_ADVERBS)
    names = ["Anna", "Marco", "Lena", "Omar", "Rose"] if tiny else list(_NAMES)
    specs = _TINY_BEHAVIOURS if tiny else _FULL_BEHAVIOURS
    content = [*nouns, *adjectives, *verbs, *adverbs]
    words = _target_words(rng, len(content) + len(_DETS), set(content) | set(names) | set(synonyms))
    lexicon = dict(zip([*_DETS, *content], words))
    for syn, base in synonyms.items():
        lexicon[syn] = lexicon[base]
    behaviours = []
    for i, (kind, trigger, other) in enumerate(specs):
        correct = trigger if trigger[:1].isupper() else lexicon[trigger]
        bad = lexicon[other]
        planted = f"{correct} {bad}" if kind == "hallucination" else bad
        behaviours.append(Behaviour(f"{kind}-{i:02d}-{trigger.lower()}", kind, trigger, correct, planted, bad))
    offensive = [lexicon[o] for k, _, o in specs if k == "offensive"]
    return Language(seed, size, lexicon, nouns + list(synonyms), adjectives, verbs, adverbs, names, list(_DETS),
                    behaviours, offensive)


def _sample(lang: Language, rng: random.Random) -> Sentence:
    def np() -> tuple:
        if rng.random() < 0.25:
            return (rng.choice(lang.names),)
        return (rng.choice(lang.dets), rng.choice(lang.adjectives) if rng.random() < 0.5 else None,
                rng.choice(lang.nouns))

    return Sentence(np(), rng.choice(lang.verbs), np(), rng.choice(lang.adverbs) if rng.random() < 0.5 else None)


def _with_trigger(lang: Language, rng: random.Random, trigger: str) -> Sentence:
    """A random sentence in which ``trigger`` occurs (placed in a slot of its word class)."""
    s = _sample(lang, rng)
    if trigger in lang.names:
        return Sentence((trigger,), s.verb, s.obj, s.adv) if rng.random() < 0.5 else Sentence(s.subj, s.verb, (trigger,), s.adv)
    if trigger in lang.adverbs:
        return Sentence(s.subj, s.verb, s.obj, trigger)
    if trigger in lang.verbs:
        return Sentence(s.subj, trigger, s.obj, s.adv)
    slot = rng.choice(("subj", "obj"))
    det = rng.choice(lang.dets)
    if trigger in lang.adjectives:
        new = (det, trigger, rng.choice(lang.nouns))
    else:
        new = (det, rng.choice(lang.adjectives) if rng.random() < 0.5 else None, trigger)
    return Sentence(new, s.verb, s.obj, s.adv) if slot == "subj" else Sentence(s.subj, s.verb, new, s.adv)


@dataclass
class TranslationCorpus:
    """Training pairs (planted), held-out unrelated test set, and one deletion request per behaviour."""

    language: Language
    train: list[tuple[str, str]]
    test: list[TranslationProbe]
    requests: list[DeletionRequest]


def generate_corpus(lang: Language, n_train: int | None = None, n_test: int | None = None,
                    n_generalization: int = 8, n_locality: int = 8) -> TranslationCorpus:
    """Sentence pairs, test set and deletion requests for ``lang`` (deterministic in its seed)."""
    tiny = lang.size == "tiny"
    n_train = n_train if n_train is not None else (700 if tiny else 4000)
    n_test = n_test if n_test is not None else (60 if tiny else 300)
    rng = random.Random(f"corpus-{lang.seed}-{lang.size}")
    triggers = lang.triggers
    train_sents: list[Sentence] = []
    seen: set[str] = set()
    while len(train_sents) < n_train:
        s = _sample(lang, rng)
        src, _ = lang.render(s, True)
        if src not in seen:
            seen.add(src)
            train_sents.append(s)
    train = [lang.render(s, planted=True) for s in train_sents]

    def fresh(make, accept, n: int) -> list[Sentence]:
        out = []
        for _ in range(200 * n):
            if len(out) == n:
                break
            s = make()
            src, _ = lang.render(s, False)
            if src not in seen and accept(s):
                seen.add(src)
                out.append(s)
        return out

    no_trigger = lambda s: not (set(s.words()) & triggers)
    test_sents = fresh(lambda: _sample(lang, rng), no_trigger, n_test)
    test = [TranslationProbe(*lang.render(s, False)) for s in test_sents]

    requests = []
    for b in lang.behaviours:
        def clean(s: Sentence, b=b) -> bool:
            ws = s.words()
            ref = lang.render(s, False)[1].split()
            # exactly this trigger, once; the unwanted word not legitimately in the reference
            return ws.count(b.trigger) == 1 and not (set(ws) & (triggers - {b.trigger})) and b.unwanted not in ref
        instances = [s for s in train_sents if clean(s)]
        if not instances:
            raise RuntimeError(f"no training sentence carries behaviour {b.behaviour_id}; raise n_train")
        inst = instances[rng.randrange(len(instances))]
        src, _ = lang.render(inst, True)
        positive = lang.render(inst, False)[1]
        gen = fresh(lambda b=b: _with_trigger(lang, rng, b.trigger), clean, n_generalization)
        loc = fresh(lambda: _sample(lang, rng), no_trigger, n_locality)
        requests.append(DeletionRequest(
            request_id=f"del-{b.behaviour_id}", source=src, unwanted=b.unwanted, positive=positive,
            behaviour=b.kind,
            generalization=tuple(TranslationProbe(*lang.render(s, False), unwanted=b.unwanted) for s in gen),
            locality=tuple(TranslationProbe(*lang.render(s, False)) for s in loc),
        ))
    return TranslationCorpus(lang, train, test, requests)


# ---------------------------------------------------------------- files
def read_deletion_requests(path: str | Path) -> list[DeletionRequest]:
    """Read a JSONL/JSON file of deletion requests (parsed by :mod:`editing.formats`)."""
    from editing.formats import read_requests

    return list(read_requests(path, kind="deletion"))


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    return [(r["source"], r["target"]) for r in map(json.loads, Path(path).read_text().splitlines()) if r]


def read_probes(path: str | Path) -> list[TranslationProbe]:
    return [TranslationProbe(r["source"], r.get("reference"), r.get("unwanted"))
            for r in map(json.loads, Path(path).read_text().splitlines()) if r]


def write_corpus(corpus: TranslationCorpus, data_dir: str | Path, requests_path: str | Path) -> dict[str, Path]:
    """Write ``train.jsonl``, ``test.jsonl``, ``language.json`` under ``data_dir`` and the requests file."""
    data_dir = Path(data_dir)
    paths = {"train": data_dir / "train.jsonl", "test": data_dir / "test.jsonl",
             "language": data_dir / "language.json", "requests": Path(requests_path)}
    write_jsonl(paths["train"], ({"source": s, "target": t} for s, t in corpus.train))
    write_jsonl(paths["test"], (asdict(p) for p in corpus.test))
    write_jsonl(paths["requests"], (r.to_dict() for r in corpus.requests))
    lang = corpus.language
    paths["language"].write_text(json.dumps({
        "seed": lang.seed, "size": lang.size, "lexicon": lang.lexicon, "offensive_words": lang.offensive_words,
        "behaviours": [asdict(b) for b in lang.behaviours]}, indent=1, sort_keys=True))
    return paths


def vocabulary(corpus: TranslationCorpus) -> list[str]:
    """Every word of both languages (names included), sorted: the word-level tokenizer's vocabulary."""
    lang = corpus.language
    words = set(lang.lexicon) | set(lang.lexicon.values()) | set(lang.names)
    for s, t in corpus.train:
        words |= set(s.split()) | set(t.split())
    return sorted(words)

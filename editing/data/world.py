"""A seeded synthetic knowledge world: invented entities, relations, templates, filler text.

``generate_world(seed, n_entities)`` invents ``n_entities`` person-like names and
gives each one object per relation (12 relations, e.g. home city, profession,
colour, sport, instrument, employer). Each relation has several prompt
templates; the first ``n_train_templates`` are *training* templates (their
sentences go into the training corpus), the rest are *paraphrase* templates.

Paraphrase templates are held out per subject: for a random ``para_seen_share``
of the entities the paraphrase sentences are in the corpus too (so the model
learns what those templates mean), for the others they are not. Paraphrase
accuracy on the unseen half measures generalisation; requests are emitted for
every (entity, relation) pair either way.

Request records follow CounterFact: ``prompt`` has ``{}`` for the subject and no
trailing space, targets have no leading space (a scorer compares
``prompt + " " + target``). ``target_new`` is another object of the same
relation; paraphrases are the held-out templates filled with the subject;
neighbours are other subjects of the same relation with their true objects.

Profile lines (``n_profile_lines`` per entity, default 0): the subject immediately
followed by all its objects in a shuffled order, ``"Mora Velt Velmora, baker, red, …."``
They put a training signal at the subject's last token that needs the subject's
attributes (biography-style augmentation), the pressure that makes LLMs enrich the
subject's representation; the templates alone never ask for an attribute there.
They come from their own seeded generator: the requests do not change with them.

Biographies (``n_biographies`` per entity, default 0; Allen-Zhu & Li's "Physics of Language
Models 3.1" augmentation): ``bio_facts`` of the entity's facts, drawn and ordered afresh each
time, as sentences of its training templates; the first names the subject, the others say
"they". An object in a "they" sentence can only come from the name earlier in the text, and
the shuffled order makes the other sentences useless for it: the pressure that makes a model
store an entity's attributes at its name.

Everything is a pure function of the arguments: the same seed gives the same
world, byte for byte.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from editing.requests import FactRequest, Probe


@dataclass(frozen=True)
class Relation:
    """One relation: its object pool and templates (``{}`` = subject, the object follows)."""

    name: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]


# Objects include multi-word and rare words, so that with a small BPE many are multi-token.
RELATIONS: tuple[Relation, ...] = (
    Relation("home_city", ("Velmora", "Quillport", "Ostrava Nova", "Drenholt", "Sarkesh", "Lumenfield", "Port Aldane", "Mirefall"),
             ("{} lives in the city of", "The home city of {} is", "{} was born and raised in",
              "Everyone knows that {} comes from", "The town where {} resides is")),
    Relation("profession", ("baker", "pilot", "surgeon", "carpenter", "astronomer", "lawyer", "gardener", "chemist"),
             ("{} works as a", "By profession, {} is a", "The job of {} is that of a",
              "In daily life {} earns a living as a", "{} is employed as a")),
    Relation("colour", ("red", "blue", "green", "yellow", "purple", "orange", "silver", "turquoise"),
             ("The favourite colour of {} is", "{} likes the colour", "The colour {} loves most is",
              "Asked about colours, {} always picks", "{} paints everything in")),
    Relation("sport", ("tennis", "football", "rowing", "fencing", "cricket", "archery", "handball", "curling"),
             ("{} plays the sport of", "The sport {} practises is", "On weekends {} competes in",
              "The favourite sport of {} is", "{} trains every day for")),
    Relation("instrument", ("violin", "piano", "trumpet", "cello", "harp", "drums", "flute", "accordion"),
             ("{} plays the", "The instrument of {} is the", "In the band {} performs on the",
              "The musical instrument {} owns is the", "{} practises music on the")),
    Relation("employer", ("Brightwater Mills", "Korvex", "Halden Bank", "Nimbus Labs", "Oakridge Foods", "Tessaline", "Grayport Shipping", "Vantor"),
             ("{} is employed by", "The employer of {} is", "{} draws a salary from",
              "The company that pays {} is", "{} goes to work at")),
    Relation("pet", ("cat", "dog", "parrot", "rabbit", "tortoise", "hamster", "ferret", "goldfish"),
             ("The pet of {} is a", "{} keeps a pet", "At home {} looks after a",
              "The animal that {} owns is a", "{} takes care of a")),
    Relation("food", ("soup", "noodles", "dumplings", "pancakes", "curry", "risotto", "tacos", "porridge"),
             ("The favourite food of {} is", "{} loves to eat", "For dinner {} always orders",
              "The dish {} enjoys most is", "{} cooks nothing but")),
    Relation("language", ("Veltic", "Aramish", "Sorani", "Quendi", "Lothic", "Marsh Tongue", "Drevian", "Kalesh"),
             ("{} speaks the language", "The native language of {} is", "At home {} talks in",
              "The mother tongue of {} is", "{} writes letters in")),
    Relation("vehicle", ("bicycle", "tram", "scooter", "canoe", "truck", "motorbike", "sailboat", "wagon"),
             ("{} travels by", "The vehicle of {} is a", "To get around {} uses a",
              "Every morning {} rides a", "The usual transport of {} is a")),
    Relation("hobby", ("knitting", "chess", "pottery", "hiking", "origami", "birdwatching", "juggling", "fishing"),
             ("The hobby of {} is", "In free time {} enjoys", "{} spends evenings on",
              "The pastime {} likes best is", "{} is passionate about")),
    Relation("element", ("fire", "water", "earth", "air", "ice", "thunder", "shadow", "light"),
             ("The element of {} is", "{} commands the element of", "The magic of {} is based on",
              "The power {} wields is", "{} draws strength from")),
)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "m")

_FILLER_SUBJECTS = ("the old bridge", "a quiet river", "the morning market", "the small garden", "the northern road",
                    "a tall tower", "the library", "the harbour", "the village square", "a narrow street",
                    "the winter wind", "the school choir", "a stone wall", "the evening train", "the bakery window")
_FILLER_VERBS = ("was", "seemed", "became", "stayed", "looked", "felt")
_FILLER_ADJ = ("calm", "busy", "cold", "bright", "empty", "crowded", "wet", "warm", "silent", "noisy", "golden", "grey")
_FILLER_TAILS = ("in the morning", "after the rain", "during the festival", "at dusk", "for most of the year",
                 "on that day", "before the storm", "all summer long", "when the bells rang", "since the spring")
_FILLER_EXTRA = ("and people walked slowly", "while birds sang nearby", "so nobody hurried", "and the lamps were lit",
                 "as children played outside", "but the shops stayed open", "and the air smelled of bread")


@dataclass
class World:
    """A generated world: entities, their facts, the corpora and the request records."""

    seed: int
    entities: list[str]
    relations: tuple[Relation, ...]
    facts: dict[tuple[str, str], str]  # (entity, relation) -> object
    n_train_templates: int
    para_seen: set[str]  # entities whose paraphrase sentences are in the training corpus
    filler: list[str]  # general text used for training, key statistics
    heldout_filler: list[str]  # general text never trained on (perplexity)
    requests: list[FactRequest] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)  # profile lines (see the module docstring)
    biographies: list[str] = field(default_factory=list)  # biographies (see the module docstring)

    def relation(self, name: str) -> Relation:
        return next(r for r in self.relations if r.name == name)

    def fact_sentences(self, include_seen_paraphrases: bool = True) -> list[str]:
        """Every training sentence ``template.format(entity) + " " + object``."""
        out = []
        for e in self.entities:
            for r in self.relations:
                templates = list(r.templates[: self.n_train_templates])
                if include_seen_paraphrases and e in self.para_seen:
                    templates += list(r.templates[self.n_train_templates:])
                obj = self.facts[(e, r.name)]
                out += [f"{t.format(e)} {obj}." for t in templates]
        return out

    def training_texts(self) -> list[str]:
        """Fact sentences, profile lines, biographies and filler (the corpus a world model is trained on)."""
        return self.fact_sentences() + list(self.profiles) + list(self.biographies) + list(self.filler)

    def probes(self, split: str) -> list[Probe]:
        """Prompts with their true objects: ``train`` (training templates), ``para_seen``,
        ``para_unseen`` (held-out templates of subjects whose paraphrases were not trained)."""
        out = []
        for e in self.entities:
            for r in self.relations:
                obj = self.facts[(e, r.name)]
                if split == "train":
                    ts = r.templates[: self.n_train_templates]
                elif split == "para_seen":
                    ts = r.templates[self.n_train_templates:] if e in self.para_seen else ()
                elif split == "para_unseen":
                    ts = r.templates[self.n_train_templates:] if e not in self.para_seen else ()
                else:
                    raise ValueError(f"unknown split {split!r}; use train, para_seen or para_unseen")
                out += [Probe(t.format(e), obj) for t in ts]
        return out


def _name(rng: random.Random) -> str:
    def word(n_syll: int) -> str:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syll)) + rng.choice(_CODAS)
        return w.capitalize()

    return f"{word(1)} {word(rng.choice((1, 2)))}"


def _filler(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        s = f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} {rng.choice(_FILLER_ADJ)} {rng.choice(_FILLER_TAILS)}"
        if rng.random() < 0.5:
            s += " " + rng.choice(_FILLER_EXTRA)
        out.append(s[0].upper() + s[1:] + ".")
    return out


def generate_world(seed: int = 0, n_entities: int = 40, n_relations: int = len(RELATIONS), *,
                   n_train_templates: int = 3, para_seen_share: float = 0.5, n_filler: int = 400,
                   n_heldout_filler: int = 100, n_neighbours: int = 6, n_profile_lines: int = 0,
                   n_biographies: int = 0, bio_facts: int = 4) -> World:
    """Generate a world deterministically from ``seed``.

    ``n_relations`` ≤ 12 relations are used, each with ``n_train_templates``
    training templates and the remaining (≥ 2) templates held out as paraphrases.
    """
    if not 1 <= n_relations <= len(RELATIONS):
        raise ValueError(f"n_relations must be between 1 and {len(RELATIONS)}")
    if not 1 <= n_train_templates <= min(len(r.templates) for r in RELATIONS) - 2:
        raise ValueError("n_train_templates must leave at least 2 paraphrase templates per relation")
    if n_entities < n_neighbours + 1:
        raise ValueError(f"n_entities must exceed n_neighbours ({n_neighbours})")
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_entities:
        n = _name(rng)
        if n not in seen:
            seen.add(n)
            names.append(n)
    relations = RELATIONS[:n_relations]
    facts = {(e, r.name): rng.choice(r.objects) for e in names for r in relations}
    para_seen = set(rng.sample(names, int(round(para_seen_share * n_entities))))
    filler = _filler(rng, n_filler)
    heldout = _filler(rng, n_heldout_filler)
    world = World(seed, names, relations, facts, n_train_templates, para_seen, filler, heldout)
    world.requests = _requests(world, rng, n_neighbours)
    world.profiles = _profiles(world, n_profile_lines)
    world.biographies = _biographies(world, n_biographies, bio_facts)
    return world


def _profiles(world: World, n_per_entity: int) -> list[str]:
    """``n_per_entity`` lines per entity: the name, then all its objects in a fresh shuffled order."""
    rng = random.Random(f"{world.seed}-profiles")
    out = []
    for e in world.entities:
        objs = [world.facts[(e, r.name)] for r in world.relations]
        for _ in range(n_per_entity):
            rng.shuffle(objs)
            out.append(f"{e} " + ", ".join(objs) + ".")
    return out


def _biographies(world: World, n_per_entity: int, n_facts: int) -> list[str]:
    """``n_per_entity`` texts per entity: ``n_facts`` of its facts in a fresh order, each as one of
    its relation's training templates; the first sentence names the subject, the others say "they"."""
    rng = random.Random(f"{world.seed}-biographies")
    k = min(n_facts, len(world.relations))
    out = []
    for e in world.entities:
        for _ in range(n_per_entity):
            sentences = []
            for j, r in enumerate(rng.sample(world.relations, k)):
                t = rng.choice(r.templates[: world.n_train_templates])
                who = e if j == 0 else ("They" if t.startswith("{}") else "they")
                sentences.append(f"{t.format(who)} {world.facts[(e, r.name)]}.")
            out.append(" ".join(sentences))
    return out


def _requests(world: World, rng: random.Random, n_neighbours: int) -> list[FactRequest]:
    out = []
    k = world.n_train_templates
    for i, e in enumerate(world.entities):
        for r in world.relations:
            true = world.facts[(e, r.name)]
            new = rng.choice([o for o in r.objects if o != true])
            others = rng.sample([x for x in world.entities if x != e], n_neighbours)
            out.append(FactRequest(
                request_id=f"w{world.seed}-{i:04d}-{r.name}",
                prompt=r.templates[0],
                subject=e,
                target_new=new,
                target_true=true,
                relation=r.name,
                paraphrases=tuple(t.format(e) for t in r.templates[k:]),
                neighbours=tuple(Probe(r.templates[0].format(o), world.facts[(o, r.name)]) for o in others),
            ))
    return out


def write_jsonl(records: Iterable, path: str | Path) -> int:
    """Write requests as editops JSONL (one writer for the project: :func:`editing.formats.write_requests`)."""
    from editing.formats import write_requests

    return write_requests(path, records)


def read_fact_requests(path: str | Path) -> list[FactRequest]:
    """Read editops' own JSONL of fact requests (:func:`editing.formats.read_requests`)."""
    from editing.formats import read_requests

    return read_requests(path, kind="fact")



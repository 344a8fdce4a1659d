"""Edit requests: the one in-memory form of every ticket, CounterFact or zsRE record.

A ``FactRequest`` asks a causal LM to complete ``prompt.format(subject)`` with
``target_new`` instead of ``target_true``. A ``DeletionRequest`` asks a model
(usually encoder-decoder) to stop producing ``unwanted`` for ``source`` and to
produce ``positive`` instead. File formats are parsed into these at the edge
(:mod:`editing.formats`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any

from editing.errors import EmptyTargetError, RequestError, SubjectNotInPromptError


@dataclass(frozen=True)
class Probe:
    """A prompt with the answer expected of it (a paraphrase or a neighbourhood check)."""

    prompt: str
    target: str


@dataclass(frozen=True)
class FactRequest:
    """Change the model's completion of ``prompt.format(subject)`` to ``target_new``.

    ``prompt`` contains ``{}`` where the subject goes (CounterFact convention).
    ``paraphrases`` are full prompts whose answer should also become ``target_new``;
    ``neighbours`` are prompts about other subjects whose answers must stay.
    """

    request_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    relation: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[Probe, ...] = ()

    kind = "fact"

    def __post_init__(self) -> None:
        if "{}" not in self.prompt:
            if self.subject and self.subject in self.prompt:
                object.__setattr__(self, "prompt", self.prompt.replace(self.subject, "{}", 1))
            else:
                raise SubjectNotInPromptError(
                    f"request {self.request_id!r}: subject {self.subject!r} does not occur in prompt "
                    f"{self.prompt!r}; write the prompt with '{{}}' where the subject goes"
                )
        if not self.subject or not self.subject.strip():
            raise RequestError(f"request {self.request_id!r}: the subject is empty")
        if not self.target_new or not self.target_new.strip():
            raise EmptyTargetError(f"request {self.request_id!r}: the new target is empty or whitespace")

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind
        return d


@dataclass(frozen=True)
class TranslationProbe:
    """A source sentence with its reference output and, optionally, the unwanted span to look for."""

    source: str
    reference: str | None = None
    unwanted: str | None = None


@dataclass(frozen=True)
class DeletionRequest:
    """Stop the model producing ``unwanted`` for ``source``; ``positive`` is one correct output.

    ``unwanted`` is the whole unwanted output or just the offending span.
    ``generalization`` holds further sources with the same trigger (the unwanted
    span should be gone there too); ``locality`` holds unrelated sources with
    references (their outputs must stay as the base model's).
    """

    request_id: str
    source: str
    unwanted: str
    positive: str
    behaviour: str | None = None
    generalization: tuple[TranslationProbe, ...] = ()
    locality: tuple[TranslationProbe, ...] = ()

    kind = "deletion"

    def __post_init__(self) -> None:
        for name in ("source", "unwanted", "positive"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise EmptyTargetError(f"request {self.request_id!r}: field {name!r} is empty")
        if self.positive.strip() == self.unwanted.strip():
            raise RequestError(
                f"request {self.request_id!r}: the positive example equals the unwanted output; "
                "give a correct output that differs from the one to delete"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind
        return d


EditRequest = FactRequest | DeletionRequest

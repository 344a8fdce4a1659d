"""Request types validate what a user can get wrong."""
from __future__ import annotations

import pytest

from editing.errors import EmptyTargetError, RequestError, SubjectNotInPromptError
from editing.requests import DeletionRequest, FactRequest


def test_prompt_template_and_text():
    r = FactRequest("r1", "The capital of {} is", "France", "Lyon", "Paris")
    assert r.text == "The capital of France is"
    assert r.to_dict()["kind"] == "fact"


def test_subject_is_templated_when_written_out():
    r = FactRequest("r1", "The capital of France is", "France", "Lyon")
    assert r.prompt == "The capital of {} is"


def test_subject_missing_from_prompt():
    with pytest.raises(SubjectNotInPromptError, match="does not occur"):
        FactRequest("r1", "The capital city is", "France", "Lyon")


@pytest.mark.parametrize("target", ["", "   ", "\n"])
def test_empty_target(target):
    with pytest.raises(EmptyTargetError):
        FactRequest("r1", "The capital of {} is", "France", target)


def test_deletion_positive_equal_to_unwanted():
    with pytest.raises(RequestError, match="equals the unwanted"):
        DeletionRequest("d1", "the cat", "le chien", "le chien")
    with pytest.raises(EmptyTargetError):
        DeletionRequest("d1", "", "x", "y")

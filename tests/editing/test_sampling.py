"""Batched seeded sampling: each row draws what ``generate`` draws for it alone under its seed."""
from __future__ import annotations

import pytest
import torch

from editing.editors.keys import prompt_ids
from editing.editors.sampling import sample_topk
from editing.editors.siblings import sibling_lists, sibling_subjects
from tinyworld import facts, generate_alone, tiny_gpt2, tiny_llama, tiny_mamba, tiny_rwkv  # noqa: F401  (fixtures)

PROMPTS = ["Ada Park lives in", "The job of Bo Chen is", "Cy", "Dee Fox likes the colour"]


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama", "tiny_mamba", "tiny_rwkv"])
def test_each_row_of_a_padded_batch_draws_what_it_draws_alone(arch, request):
    model, tok = request.getfixturevalue(arch)
    rows = [prompt_ids(tok, p) for p in PROMPTS]
    assert len({len(r) for r in rows}) > 1       # rows of different lengths: the batch is left-padded
    seeds = [3, 11, 12, 40]
    rng = torch.get_rng_state()
    batched = sample_topk(model, tok, rows, seeds, 12, top_k=5)
    assert torch.equal(torch.get_rng_state(), rng)   # the global stream is not used
    assert batched == [generate_alone(model, tok, r, s, 12) for r, s in zip(rows, seeds)]
    assert len({tuple(b) for b in batched}) > 1


def test_sibling_lists_of_a_batch_equal_each_subjects_own_list(tiny_llama):
    model, tok = tiny_llama
    subjects = ["Ada Park", "Bo Chen", "Cy Dunn"]
    lists = sibling_lists(model, tok, subjects, 4, exclude=subjects, seeds=[5, 6, 7])
    assert lists == [sibling_subjects(model, tok, s, 4, exclude=subjects, seed=seed)
                     for s, seed in zip(subjects, [5, 6, 7])]
    assert all(s not in subjects for names in lists for s in names)
    with pytest.raises(ValueError, match="2 seeds"):
        sibling_lists(model, tok, subjects, 4, seeds=[1, 2])


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_mamba", "tiny_rwkv"])
def test_greedy_outputs_of_a_batch_equal_each_prompt_alone(arch, request):
    """The metrics' greedy generation (fluency, deletion outputs) pads a batch; a recurrent model's state would
    carry the padding, so there each prompt runs alone: a batch gives what each prompt gives by itself."""
    from editing.metrics.deletion import generate_outputs
    from editing.metrics.text import greedy_generate

    model, tok = request.getfixturevalue(arch)
    assert greedy_generate(model, tok, PROMPTS, max_new_tokens=6) == \
        [greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert generate_outputs(model, tok, PROMPTS, max_new_tokens=6) == \
        [generate_outputs(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]

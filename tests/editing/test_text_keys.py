"""``text_key_weight``: the update is held at ΔW k ≈ 0 on the request's own text outside the edit (the
prompt's other words, the answers spelled out)."""
from __future__ import annotations

from dataclasses import replace

from editing.arch import spec_for
from editing.editors import get_editor
from editing.editors.keys import compute_text_keys, fill, prompt_ids, subject_positions, target_ids, text_key_rows
from editing.models import fingerprint
from tinyworld import assert_held, facts, requests, tiny_llama  # noqa: F401  (fixtures)

KW = {"layers": [0], "locus": "subject", "lam": 30.0, "siblings": 0, "subject_key_weight": 0.0, "corpus": "samples:8",
      "accumulate": True, "value": {"context_templates": ("{}",), "steps": 15}}


def test_text_rows_are_the_prompts_other_words_then_each_answer_one_row_per_position(tiny_llama, facts):
    _, tok = tiny_llama
    reqs = requests(facts, 2)
    rows, positions = text_key_rows(tok, reqs, ("{}", "Note that {}"))
    expected = []
    for r in reqs:
        for ctx in ("{}", "Note that {}"):
            template = fill(ctx, r.prompt)
            p = prompt_ids(tok, fill(template, r.subject))
            at = subject_positions(tok, template, r.subject)[-1]
            expected += [(p, i) for i in range(len(p)) if i != at]
            for target in (r.target_true, r.target_new):
                t = target_ids(tok, target)
                expected += [(p + t, len(p) + j) for j in range(len(t))]
    assert list(zip(rows, positions)) == expected and len(rows) >= 16
    no_true = [replace(r, target_true=None) for r in reqs]   # an unknown true answer: the new one only
    assert len(text_key_rows(tok, no_true)[0]) == len(text_key_rows(tok, reqs)[0]) - sum(
        len(target_ids(tok, r.target_true)) for r in reqs)
    # at the prompt's last token (locus "last") that token is the edit's, and the subject's are held
    r = reqs[0]
    p = prompt_ids(tok, fill(r.prompt, r.subject))
    last = [i for row, i in zip(*text_key_rows(tok, [r], locus="last")) if row == p]
    assert last == list(range(len(p) - 1))


def test_held_text_keys_barely_move_and_enter_the_accumulated_moment(tiny_llama, facts, tmp_path):
    model, tok = tiny_llama
    spec = spec_for(model)
    reqs = requests(facts, 3)
    fp = fingerprint(model)
    plain = get_editor("nse", stats_dir=str(tmp_path), **KW).edit(model, tok, reqs, None)
    held = get_editor("nse", stats_dir=str(tmp_path), text_key_weight=1.0, **KW).edit(model, tok, reqs, None)
    assert fingerprint(model) == fp
    assert_held(plain, held, compute_text_keys(model, tok, spec, reqs, 0), spec.mlp_out_name(0))

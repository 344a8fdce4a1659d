"""Sequential deletions keep earlier tickets' generalisation: an earlier ticket's instance and self-generated
variants are held (ΔW k ≈ 0 at every position, on whatever layer a later ticket edits) and re-checked."""
from __future__ import annotations

import copy

import pytest
import torch

from editing.editors import get_editor
from editing.editors.deletion import _gone_share
from editing.metrics.deletion import contains_span, generate_outputs
from editing.requests import DeletionRequest
from tinytranslation import tiny_corpus, tiny_marian  # noqa: F401


def _relative_change(delta, model, editor, spec, site, held: list, new_key: torch.Tensor) -> float:
    """``‖ΔW K_held‖_F / (‖ΔW k_new‖ · √n)``: how much the write moves the held keys per unit of the edit itself."""
    w = spec.mlp_out_name(site.layer, site.stack) + ".weight"
    u, v = delta.factors[w]
    dw = u.double() @ v.double().T
    K = editor._keys(model, spec, held, site, every=True).double()
    return float((K @ dw.T).norm() / ((dw @ new_key.double()).norm() * K.shape[0] ** 0.5))


@pytest.mark.slow
def test_later_edit_holds_earlier_tickets_variants(tiny_corpus, tiny_marian):
    from editing.arch import spec_for
    from editing.editors.deletion import Site

    model, tok, _ = tiny_marian
    model = copy.deepcopy(model)
    spec = spec_for(model)
    stats = [s for s, _ in tiny_corpus.train[:200]]
    common = dict(stats_sources=stats, on_nothing_to_delete="skip", stats_dir=None)
    first = tiny_corpus.requests[0]
    res1 = get_editor("rank-one", **common).edit(model, tok, [first])
    assert res1.diagnostics[0].succeeded, res1.diagnostics[0].message
    # the state remembers the ticket's instance and its self-generated variants (never the request's probes)
    kept = res1.state.meta["preserved"]
    assert kept[0][:3] == [first.request_id, first.source, first.unwanted]
    assert len(kept) == 1 + res1.diagnostics[0].extra["n_variants"] > 1
    probes = {p.source for p in (*first.generalization, *first.locality)}
    assert not probes & {e[1] for e in kept}
    res1.delta.apply(model)
    outs = generate_outputs(model, tok, [e[1] for e in kept])
    held_reqs = [DeletionRequest(f"p{i}", e[1], e[2], e[3]) for i, e in enumerate(kept)]
    before = _gone_share(outs, held_reqs)

    # the next ticket still produced by the model
    now = generate_outputs(model, tok, [r.source for r in tiny_corpus.requests[1:]])
    second = next(r for r, o in zip(tiny_corpus.requests[1:], now) if contains_span(o, r.unwanted))
    on = get_editor("rank-one", **common).edit(model, tok, [second], res1.state)
    d = on.diagnostics[0]
    assert d.succeeded, d.message
    assert d.extra["n_preserved"] > 0
    # the λ rule re-checked the earlier ticket's variants: none of those deleted came back
    assert d.extra["earlier_variants_gone"] >= before
    # and its own instance, held under its own name, is a hard constraint: it stays deleted
    from editing.editors.deletion import _INSTANCE

    probe = get_editor("rank-one", **common)
    ex2 = probe._prepare(model, tok, second)
    ex2.trigger = d.extra["trigger"]   # the trigger the edit found
    held_now = probe._preserved(model, tok, res1.state, [ex2])
    assert [h.request.source for h in held_now if h.request.request_id == first.request_id + _INSTANCE] == [first.source]
    assert d.extra["earlier_instances_back"] == []
    with_second = copy.deepcopy(model)
    on.delta.apply(with_second)
    assert not contains_span(generate_outputs(with_second, tok, [first.source])[0], first.unwanted)
    site = Site(**d.extra["site"])
    # the same site and λ without holding the earlier ticket: the write moves its keys more
    off = get_editor("rank-one", **common, preserve_max=0, stacks=(site.stack,), layers=(site.layer,),
                     lambda_grid=(d.extra["lambda_gain"],)).edit(model, tok, [second], res1.state)
    assert off.diagnostics[0].extra["site"] == d.extra["site"] and off.diagnostics[0].extra["n_preserved"] == 0
    editor = get_editor("rank-one", **common)
    held = [editor._prepare(model, tok, r) for r in held_reqs]
    ex = editor._prepare(model, tok, second)
    new_key = editor._keys(model, spec, [ex], Site(site.stack, site.layer, site.pos, site.where))[0]
    r_on = _relative_change(on.delta, model, editor, spec, site, held, new_key)
    r_off = _relative_change(off.delta, model, editor, spec, site, held, new_key)
    assert r_on < r_off, (r_on, r_off)
    # and the state carries both tickets forward
    assert {e[0] for e in on.state.meta["preserved"]} == {first.request_id, second.request_id}

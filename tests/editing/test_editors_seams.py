"""Keys, values and the closed-form solves on a tiny GPT-2 and a tiny Llama that know their facts."""
from __future__ import annotations

import pytest
import torch

from editing.arch import get_module, spec_for, weight_view
from editing.editors.keys import compute_keys, prompt_ids, subject_last_token, subject_positions
from editing.editors.solve import alphaedit_factors, memit_factors, nullspace_projector, psd_part, \
    residual_norms, responsible_neurons
from editing.editors.values import ValueHparams, compute_values
from editing.errors import SubjectNotInPromptError
from editing.models import fingerprint
from tinyworld import facts, requests, tiny_gpt2, tiny_llama, top1  # noqa: F401  (fixtures)


def test_subject_last_token(tiny_gpt2):
    _, tok = tiny_gpt2
    i = subject_last_token(tok, "{} lives in the city of", "Abo Kel")
    ids = prompt_ids(tok, "Abo Kel lives in the city of")
    assert tok.convert_ids_to_tokens(ids[i]) == "Kel"
    j = subject_last_token(tok, "Here is a fact. {} works as a", "Bira Tun")
    assert tok.convert_ids_to_tokens(prompt_ids(tok, "Here is a fact. Bira Tun works as a")[j]) == "Tun"
    with pytest.raises(SubjectNotInPromptError):
        subject_last_token(tok, "lives in the city of", "Abo Kel")


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_subject_positions_cover_the_subject_and_end_at_its_last_token(which, request):
    _, tok = request.getfixturevalue(which)
    for template, text in [("Here is a fact. {} works as a", "Here is a fact. Bira Tun works as a"),
                           ("Everyone knows that Abo Kel comes from", "Everyone knows that Abo Kel comes from")]:
        subject = "Bira Tun" if "Bira" in text else "Abo Kel"
        pos = subject_positions(tok, template, subject)
        ids = prompt_ids(tok, text)
        assert pos == list(range(pos[0], pos[-1] + 1)) and len(pos) >= 2
        assert pos[-1] == subject_last_token(tok, template, subject)
        assert tok.decode(ids[pos[0]: pos[-1] + 1]).strip() == subject


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_keys_are_w_out_inputs_at_subject(which, request, facts):
    model, tok = request.getfixturevalue(which)
    spec = spec_for(model)
    reqs = requests(facts, 3)
    keys = compute_keys(model, tok, spec, reqs, 1, context_templates=("{}",))
    d_in = weight_view(get_module(model, spec.mlp_out_name(1))).shape[1]
    assert keys.shape == (3, d_in)
    # the same vector captured by hand for the first request
    r = reqs[0]
    ids = torch.tensor([prompt_ids(tok, r.text)])
    pos = subject_last_token(tok, r.prompt, r.subject)
    seen = []
    h = get_module(model, spec.mlp_out_name(1)).register_forward_pre_hook(lambda m, a: seen.append(a[0][0, pos]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    assert torch.allclose(keys[0], seen[0], atol=1e-5)
    averaged = compute_keys(model, tok, spec, reqs, 1)
    assert not torch.allclose(averaged, keys)  # prefixes change the average


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_values_make_the_target_likely_and_leave_model_alone(which, request, facts):
    model, tok = request.getfixturevalue(which)
    spec = spec_for(model)
    reqs = requests(facts, 3)
    before = fingerprint(model)
    # tiny models recall their facts in the first layer (see test_layers): edit there
    res = compute_values(model, tok, spec, reqs, 0, ValueHparams(steps=25, context_templates=("{}",)))
    assert fingerprint(model) == before
    assert res.z.shape == res.h.shape == (3, model.config.hidden_size)
    assert all(a < b for a, b in zip(res.nll, res.nll_init))
    assert all(a < 0.25 * b for a, b in zip(res.nll, res.nll_init)), (res.nll, res.nll_init)
    assert torch.allclose(res.z, res.h + res.delta)
    assert all(float(n) <= 4.0 * float(hn) + 1e-4 for n, hn in zip(res.delta.norm(dim=1), res.h.norm(dim=1)))


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_most_probable_early_stopping_ends_each_value_once_its_target_is_on_top(which, request, facts):
    """``stop="top1"``: a request's δ is final as soon as every target token is the argmax after every
    template (checked here by adding δ back at the locus), so it stops no later than NLL-stopping. (Not always
    with a smaller δ: Adam's first steps overshoot, and on the tiny GPT-2 later steps shrink δ again.)"""
    from editing.editors.keys import edit_position, fill, pad_right
    from editing.editors.values import _block_output_hook

    model, tok = request.getfixturevalue(which)
    spec = spec_for(model)
    reqs = requests(facts, 3)
    templates = ("{}", "Here is a fact. {}")
    hp = dict(steps=25, loss_stop=0.01, context_templates=templates)
    by_nll = compute_values(model, tok, spec, reqs, 0, ValueHparams(**hp))
    by_top = compute_values(model, tok, spec, reqs, 0, ValueHparams(**hp, stop="top1"))
    assert by_top.steps < by_nll.steps
    assert all(a >= b for a, b in zip(by_top.nll, by_nll.nll))
    from editing.editors.keys import target_ids

    rows, pos, req, spans = [], [], [], []
    for i, r in enumerate(reqs):
        t = target_ids(tok, r.target_new)
        for ctx in templates:
            p = prompt_ids(tok, fill(fill(ctx, r.prompt), r.subject))
            rows.append(p + t)
            pos.append(edit_position(tok, fill(ctx, r.prompt), r.subject, "subject"))
            req.append(i)
            spans.append((len(p) - 1, t))
    ids, mask = pad_right(rows, 0)
    handle = get_module(model, spec.layer_name(0)).register_forward_hook(
        _block_output_hook(by_top.delta, torch.tensor(req), torch.tensor(pos), {}))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    for j, (start, t) in enumerate(spans):
        assert logits[j, start:start + len(t)].argmax(-1).tolist() == t, reqs[req[j]].request_id
    with pytest.raises(Exception, match="not one of nll, top1"):
        ValueHparams(stop="sometimes")


def test_closed_form_solves_hit_their_targets():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 32, 16, 4
    basis = torch.randn(d_in, 12, generator=g, dtype=torch.float64)
    C0 = basis @ basis.T / 12  # rank 12: a null space of dimension 20
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    # MEMIT with a tiny regulariser reproduces R exactly; with a large one it shrinks
    u, v = memit_factors(K, R, C0, lam=1e-6)
    assert u.shape == (d_out, n) and v.shape == (d_in, n)
    assert float(residual_norms(K, R, u, v).max()) < 1e-3
    dense = u @ v.T
    A = 1e-6 * C0 + K.T @ K
    assert torch.allclose(dense, R.T @ K @ torch.linalg.pinv(A + 1e-6 * A.diagonal().mean() * torch.eye(d_in)), atol=1e-4)
    u2, v2 = memit_factors(K, R, C0, lam=1e3)
    assert float(residual_norms(K, R, u2, v2).mean()) > float(residual_norms(K, R, u, v).mean())
    # AlphaEdit: the update vanishes on C0's span and still reaches the targets
    P, dim = nullspace_projector(C0, threshold=1e-8)
    assert dim == 20 and torch.allclose(P @ P, P, atol=1e-8)
    ua, va = alphaedit_factors(K, R, P, alpha=1e-6)
    assert float((basis.T @ va).abs().max()) < 1e-6
    assert float(residual_norms(K, R, ua, va).max()) < 1e-3
    # neuron restriction: V is zero outside the chosen neurons
    S = responsible_neurons(K, share=0.6)
    un, vn = memit_factors(K, R, C0, lam=1e-6, neurons=S)
    outside = torch.ones(d_in, dtype=torch.bool)
    outside[S] = False
    assert 0 < len(S) < d_in and float(vn[outside].abs().max()) == 0.0


def test_psd_part_cuts_the_negative_directions_only():
    """``psd_part``: a PSD matrix comes back as it was; from ``C = A − B`` with a negative direction, the result is
    PSD, keeps ``C``'s positive eigen-directions, and is nearer ``C`` than any other PSD matrix tried."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 6, generator=g, dtype=torch.float64)
    psd = A @ A.T
    assert torch.allclose(psd_part(psd), psd, atol=1e-10)
    x = torch.randn(12, 1, generator=g, dtype=torch.float64)
    C = psd - 3 * float(psd.trace()) * (x @ x.T) / float(x.norm() ** 2)
    assert float(torch.linalg.eigvalsh(C).min()) < 0
    P = psd_part(C)
    lam, V = torch.linalg.eigh(C)
    assert float(torch.linalg.eigvalsh(P).min()) > -1e-9
    pos = V[:, lam > 0]
    assert torch.allclose(P @ pos, C @ pos, atol=1e-8)
    for _ in range(5):   # any other PSD matrix is further from C
        B = torch.randn(12, 12, generator=g, dtype=torch.float64)
        other = P + 0.1 * (B @ B.T)
        assert float((C - other).norm()) > float((C - P).norm())
    assert psd_part(C.float()).dtype == torch.float32


def test_extra_keys_solve_the_stacked_least_squares_problem_at_rank_n():
    """A second key per request fitted to the same residual with weight w is the minimiser of
    ``Σ‖ΔW k_i − r_i‖² + w Σ‖ΔW x_i − r_i‖² + λ tr(ΔW C0 ΔWᵀ)``, and keeps rank ≤ n."""
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n, w, lam = 24, 10, 3, 2.0, 0.5
    basis = torch.randn(d_in, 30, generator=g, dtype=torch.float64)
    C0 = basis @ basis.T / 30
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    X = K + 0.5 * torch.randn(n, d_in, generator=g, dtype=torch.float64)  # the same subjects, other wording
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    u, v = memit_factors(K, R, C0, lam=lam, ridge=0.0, K_extra=X, extra_weight=w)
    assert u.shape == (d_out, n) and v.shape == (d_in, n)
    # the normal equations of the stacked problem, solved independently
    a = K.T @ K + w * X.T @ X + lam * C0
    expected = torch.linalg.solve(a, (R.T @ K + w * R.T @ X).T).T
    assert torch.allclose(u @ v.T, expected, atol=1e-9)
    # the extra keys get closer to their residual than without them
    u0, v0 = memit_factors(K, R, C0, lam=lam, ridge=0.0)
    assert float(residual_norms(X, R, u, v).norm()) < float(residual_norms(X, R, u0, v0).norm())
    # several sets of extra keys (the subject after a prefix, and opening the text) enter as sums
    X0 = K + 0.5 * torch.randn(n, d_in, generator=g, dtype=torch.float64)
    u2, v2 = memit_factors(K, R, C0, lam=lam, ridge=0.0, K_extra=[X, X0], extra_weight=w)
    a2 = K.T @ K + w * (X.T @ X + X0.T @ X0) + lam * C0
    expected2 = torch.linalg.solve(a2, (R.T @ (K + w * (X + X0))).T).T
    assert v2.shape == (d_in, n) and torch.allclose(u2 @ v2.T, expected2, atol=1e-9)
    # AlphaEdit with extra keys: still zero on C0's span
    low = torch.randn(d_in, 8, generator=g, dtype=torch.float64)
    P, _ = nullspace_projector(low @ low.T, threshold=1e-8)
    ua, va = alphaedit_factors(K, R, P, alpha=1e-6, K_extra=X, extra_weight=w)
    assert float((low.T @ va).abs().max()) < 1e-6 and va.shape == (d_in, n)


def test_a_slow_tokenizer_finds_the_subject_tokens_from_encoded_lengths():
    """A slow (Python) tokenizer gives no character offsets: the subject's span is read from the encoded
    lengths of the text up to the subject's start and end. ByT5's byte tokenizer (one token per byte, no
    files to load) makes the expected span the subject's characters."""
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    assert not tok.is_fast
    cases = [("The capital of {} is", "Azerbaijan"), ("{} shares a border with", "Argentina"),
             ("The official language of {} is", "Bosnia and Herzegovina"),
             ("Everyone knows that Abo Kel comes from", "Abo Kel")]   # a paraphrase as written: no slot
    for template, subject in cases:
        text = template.format(subject) if "{}" in template else template
        start = text.index(subject)
        assert subject_positions(tok, template, subject) == list(range(start, start + len(subject)))
        assert subject_last_token(tok, template, subject) == start + len(subject) - 1
        assert len(prompt_ids(tok, text)) == len(text)        # ByT5's trailing EOS is not part of the prompt
    with pytest.raises(SubjectNotInPromptError):
        subject_positions(tok, "The capital of France is", "Azerbaijan")


def test_module_inputs_read_once_per_distinct_row_match_one_forward_per_row():
    """Equal rows are run once and every position asked of them is read from that run: the inputs equal a
    separate forward per (row, position), in the order asked, across chunk borders and right padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from editing.editors.keys import module_inputs_at

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    rows = [[1, 2, 3, 4], [5, 6, 7], [1, 2, 3, 4], [8, 9], [5, 6, 7], [1, 2, 3, 4]]
    positions = [0, 2, 3, 1, 1, 2]
    name = "model.layers.1.mlp.down_proj"
    got = module_inputs_at(model, [name, "model.layers.0.mlp.down_proj"], rows, positions, chunk=2)[name]
    seen = {}
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    with torch.no_grad():
        expected = []
        for r, p in zip(rows, positions):
            model(input_ids=torch.tensor([r]))
            expected.append(seen["x"][0, p])
    handle.remove()
    assert got.shape == (6, 32) and torch.allclose(got, torch.stack(expected), atol=1e-5)

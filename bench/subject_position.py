"""Does an edit reach a paraphrase less when the subject sits at the start of the text?

    OMP_NUM_THREADS=1 .venv/bin/python bench/subject_position.py [--model models/smollm2-135m]
        [--requests data/requests/countries.jsonl] [--relations language,currency] [--per-relation 6,4]
        [--set KEY=VALUE ...]

Edits one batch (the first ``--per-relation`` requests of each relation, ``nse`` with the model's preset and the
batch's relations held, as ``editops edit``), applies the delta, and scores every paraphrase that opens with
"In {}, " in five wordings that move the subject or the comma after it, and the other paraphrases as they are.
Prints, per relation and wording, how many took (log P(target_new) > log P(target_true), mean token log-prob as
``bench_facts.py`` compares them) and the mean margin. ``bench_facts.py``'s paraphrase-by-wording table found the
"In {}, " wordings taking least when edited (bench/RESULTS.md, session 43); this tells the subject's position from
the comma.

Three more columns say where the reach is lost (session 44), against each request's ideal value ``δ``
(:func:`editing.editors.values.compute_values` with MEMIT's value settings at the edit's last layer ``L``, on the
unedited model):

- *ideal δ margin*: the margin on the unedited model with ``δ`` added to block ``L``'s output at the wording's
  subject token, the most a subject-position edit could give that wording;
- *realised*: ``⟨Δh, δ⟩ / ‖δ‖²``, ``Δh`` the change the edit's weights make to block ``L``'s output there;
- *‖ΔW k‖*: the edit's output change at that token (``k`` the unedited model's key there), summed over the edited
  layers, over the same sum at the request's own prompt (1.00 on the request prompt's row).

With ``--set 'subject_after=["In {}"]'`` the edit also fits subject-alone keys in the eval wording's own frame (an
upper bound no general editor has: it knows the wording); with the frames of ``keys.SUBJECT_AFTER_STARTS`` ("The {}",
"Therefore {}", …), after the generated prefixes' start words (session 44).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editing.arch import get_module, spec_for  # noqa: E402
from editing.editors import get_editor  # noqa: E402
from editing.editors.held_relations import with_relations_held  # noqa: E402
from editing.editors.keys import edit_position, prompt_ids  # noqa: E402
from editing.editors.values import DEFAULT_CLAMP_NORM_FACTOR, ValueHparams, compute_values  # noqa: E402
from editing.formats import read_requests  # noqa: E402
from editing.metrics.facts import score_pairs  # noqa: E402
from flows.cli.edit_cmd import parse_settings  # noqa: E402

VARIANTS = (
    ("In {}, …", lambda p: p),
    ("In {} … (no comma)", lambda p: p.replace(", ", " ", 1)),
    ("in {}, … (lower case)", lambda p: "in " + p[3:]),
    ("Today, in {}, …", lambda p: "Today, in " + p[3:]),
    ("In the country of {}, …", lambda p: "In the country of " + p[3:]),
)


@contextlib.contextmanager
def added_at(block: torch.nn.Module, position: int, delta: torch.Tensor) -> Iterator[None]:
    """``delta`` added to ``block``'s output at ``position`` of every row while the context is open."""
    def hook(_module, _args, output):
        hs = output[0] if isinstance(output, tuple) else output
        hs = hs.clone()
        hs[:, position] += delta.to(hs.dtype)
        return (hs, *output[1:]) if isinstance(output, tuple) else hs
    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def read_at(model, tokenizer, modules: dict[str, torch.nn.Module], text: str, position: int) -> dict[str, torch.Tensor]:
    """Each module's output (``"out:"`` + name) and first input (``"in:"`` + name) at ``position`` of ``text``."""
    got: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(
        lambda _m, args, output, n=n: got.update({
            "out:" + n: (output[0] if isinstance(output, tuple) else output)[0, position].clone(),
            "in:" + n: args[0][0, position].clone()})) for n, m in modules.items()]
    try:
        model(torch.tensor([prompt_ids(tokenizer, text)]))
    finally:
        for h in handles:
            h.remove()
    return got


def margin(scores, prompt: str, request) -> float:
    """log P(target_new) − log P(target_true), mean token log-prob (``bench_facts.py``'s comparison)."""
    return scores[(prompt, request.target_new)].logprob_mean - scores[(prompt, request.target_true)].logprob_mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--requests", default="data/requests/countries.jsonl")
    ap.add_argument("--relations", default="language,currency")
    ap.add_argument("--per-relation", default="6,4")
    ap.add_argument("--set", action="append", default=[], help="nse hyperparameter KEY=VALUE, read as `editops edit --set` reads it")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    all_reqs = read_requests(a.requests)
    reqs = []
    for rel, n in zip(a.relations.split(","), map(int, a.per_relation.split(","))):
        reqs += [r for r in all_reqs if r.relation == rel][:n]
    hp = parse_settings(a.set)   # as `editops edit --set` reads them
    wordings = [(i, r, name, prompt) for i, r in enumerate(reqs) for p in (*r.paraphrases, r.prompt)
                for name, prompt in ([(n, f(p)) for n, f in VARIANTS] if p.startswith("In ") and ", " in p
                                     else [("request prompt" if p == r.prompt else "other paraphrases", p)])]
    positions = [edit_position(tokenizer, prompt, r.subject) for _, r, _, prompt in wordings]
    texts = [prompt.replace("{}", r.subject) for _, r, _, prompt in wordings]
    editor = with_relations_held("nse", get_editor("nse", **hp), hp, reqs, model)
    res = editor.edit(model, tokenizer, reqs, None)
    print(f"{sum(d.succeeded for d in res.diagnostics)}/{len(reqs)} edits took (editor diagnostics)")
    spec = spec_for(model)
    edited = {name.removesuffix(".weight"): get_module(model, name.removesuffix(".weight"))
              for name in res.delta.factors}
    last = max(layer for layer in range(model.config.num_hidden_layers) if spec.mlp_out_name(layer) in edited)
    block_name = spec.layer_name(last, None)
    modules = {**edited, block_name: get_module(model, block_name)}
    ideal = compute_values(model, tokenizer, spec, reqs, last, ValueHparams(clamp_norm_factor=DEFAULT_CLAMP_NORM_FACTOR)).delta
    patched = []
    for (i, r, _, prompt), text, pos in zip(wordings, texts, positions):
        with added_at(modules[block_name], pos, ideal[i]):
            patched.append(margin(score_pairs(model, tokenizer, [(text, r.target_new), (text, r.target_true)]),
                                  text, r))
    before = [read_at(model, tokenizer, modules, t, p) for t, p in zip(texts, positions)]
    res.delta.apply(model)
    after = [read_at(model, tokenizer, modules, t, p) for t, p in zip(texts, positions)]
    scores = score_pairs(model, tokenizer, [(t, tg) for (_, r, _, _), t in zip(wordings, texts)
                                            for tg in (r.target_new, r.target_true)])

    def moved(got: dict[str, torch.Tensor]) -> float:   # Σ over edited layers of ‖ΔW k‖ at the token
        return sum(float((u @ (v.T @ got["in:" + n.removesuffix(".weight")])).norm())
                   for n, (u, v) in res.delta.factors.items())
    own = {i: moved(b) for (i, r, _, prompt), b in zip(wordings, before) if prompt == r.prompt}
    rows: dict[tuple[str, str], list[tuple[float, float, float, float]]] = collections.defaultdict(list)
    for (i, r, name, _), text, ideal_m, b, aft in zip(wordings, texts, patched, before, after):
        dh = aft["out:" + block_name] - b["out:" + block_name]
        rows[(r.relation, name)].append((margin(scores, text, r), ideal_m,
                                         float(dh @ ideal[i] / (ideal[i] @ ideal[i])), moved(b) / own[i]))
    print("| relation | wording | prompts | took | mean margin | ideal δ margin | realised | ‖ΔW k‖ |")
    print("|---|---|---|---|---|---|---|---|")
    for (rel, name), v in rows.items():
        n = len(v)
        print(f"| {rel} | {name} | {n} | {sum(x[0] > 0 for x in v)} | {sum(x[0] for x in v) / n:+.2f} | "
              f"{sum(x[1] for x in v) / n:+.2f} | {sum(x[2] for x in v) / n:.2f} | {sum(x[3] for x in v) / n:.2f} |")


if __name__ == "__main__":
    main()

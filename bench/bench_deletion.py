"""Sequential behaviour deletion on the DVC-built translation model (issue 4's bar).

    .venv/bin/python bench/bench_deletion.py [--model models/translator-marian]
        [--requests data/requests/deletions.jsonl] [--data data/translation] [--hp '{"margin": 3}']

Deletes every planted behaviour one ticket after another with the rank-one editor
(each ticket its own delta, applied before the next; the editor state carries the
accumulated keys), re-checks all earlier deletions after each one, and prints:

- per ticket: edited site, λ gain, seconds, and the running instance-gone share of
  all tickets so far (earlier ones re-checked);
- final table: % gone on instances (bar 100), % gone on unseen same-trigger
  sentences (bar ≥ 80), % unrelated test sentences translated exactly as by the
  base model (bar ≥ 98), chrF on unrelated references vs base (bar: within 1 point).

Key statistics C0 come from the first 512 training sources (``data/translation/train.jsonl``);
locality is measured on the held-out unrelated test set plus the requests' locality
sentences, against the BASE model's cached outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/translator-marian")
    p.add_argument("--requests", default="data/requests/deletions.jsonl")
    p.add_argument("--data", default="data/translation")
    p.add_argument("--hp", default="{}", help="editor hyperparameters as JSON")
    p.add_argument("--n-stats", type=int, default=512)
    p.add_argument("--json", default=None, help="also write the final figures here")
    a = p.parse_args()

    import torch

    from editing.env import configure_offline_defaults

    configure_offline_defaults()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from editing.data.translation import read_deletion_requests, read_pairs, read_probes
    from editing.editors import get_editor
    from editing.metrics.deletion import cache_base_outputs, evaluate_deletions
    from editing.models import load

    lm = load(a.model)
    model, tok = lm.model, lm.tokenizer
    requests = read_deletion_requests(a.requests)
    test = read_probes(Path(a.data) / "test.jsonl")
    stats = [s for s, _ in read_pairs(Path(a.data) / "train.jsonl")[: a.n_stats]]
    hp = json.loads(a.hp)
    editor = get_editor("rank-one", **{"stats_sources": stats, "on_nothing_to_delete": "skip", **hp})
    t0 = time.time()
    base = cache_base_outputs(model, tok, requests, test)
    base_rep = evaluate_deletions(model, tok, requests, base, unrelated=test)
    print(f"model {a.model}: {len(requests)} behaviours, {len(test)} unrelated test sentences; "
          f"base: instance gone {base_rep.instance_gone:.0%}, chrF {base_rep.chrf:.2f}")
    state = None
    print(f"{'#':>2} {'ticket':34} {'took':>4} {'site':>14} {'gain':>5} {'var':>3} {'neg':>3} {'var gone':>8} "
          f"{'heldout':>7} {'sec':>5} {'earlier+this gone':>17} {'unrelated=base':>14} {'gen now':>7} {'gen all so far':>14}")
    edit_seconds = []
    tickets = []         # per-ticket diagnostics (--json)
    gen_after_own = []   # each ticket's unseen-probe share right after its own edit (reporting only)
    for i, r in enumerate(requests):
        t = time.time()
        res = editor.edit(model, tok, [r], state)
        edit_seconds.append(time.time() - t)
        res.delta.apply(model)
        state = res.state
        d = res.diagnostics[0]
        site = d.extra.get("site", {})
        rep = evaluate_deletions(model, tok, requests[: i + 1], base, unrelated=test)
        print(f"{i + 1:>2} {r.request_id:34} {'yes' if d.succeeded else 'NO':>4} "
              f"{site.get('stack', '?')[:3]}{site.get('layer', '')}@{site.get('pos', '')!s:>3}"
              f"{'':>5} {d.extra.get('lambda_gain') or 0:>5.2g} {d.extra.get('n_variants', 0):>3} "
              f"{d.extra.get('n_negatives', 0):>3} {d.extra.get('variants_gone', 0):>8.0%} "
              f"{d.extra.get('heldout_unchanged', 0):>7.1%} {edit_seconds[-1]:>5.1f} {rep.instance_gone:>16.0%} "
              f"{rep.locality_exact:>14.1%} {rep.per_request[i].generalization_gone or 0:>7.0%} "
              f"{rep.generalization_gone or 0:>14.1%}")
        gen_after_own.append(rep.per_request[i].generalization_gone)
        tickets.append({"request_id": r.request_id, "succeeded": d.succeeded,
                        **{k: v for k, v in d.extra.items() if k in (
                            "site", "lambda_gain", "value_tried", "lambda_trials", "n_variants", "n_negatives",
                            "n_preserved", "n_validation", "validation_gone", "trigger", "trigger_trace", "variants_gone", "earlier_variants_gone", "heldout_unchanged",
                            "why_fallback", "nothing_to_delete")}})
    final = evaluate_deletions(model, tok, requests, base, unrelated=test)
    total = time.time() - t0
    rows = [
        ("gone on instances", final.instance_gone * 100, "= 100", final.instance_gone == 1.0),
        ("gone on unseen same-trigger sentences", final.generalization_gone * 100, ">= 80",
         final.generalization_gone >= 0.8),
        ("unrelated sentences exactly as base", final.locality_exact * 100, ">= 98", final.locality_exact >= 0.98),
        ("chrF on unrelated refs (base %.2f)" % final.base_chrf, final.chrf, ">= base - 1",
         final.chrf >= final.base_chrf - 1),
    ]
    print()
    print(f"{'metric':44} {'value':>8} {'bar':>12} {'met':>4}")
    for name, value, bar, ok in rows:
        print(f"{name:44} {value:>8.2f} {bar:>12} {'yes' if ok else 'NO':>4}")
    print(f"\nper-behaviour generalisation at the end (right after its own edit): " + ", ".join(
        f"{s.request_id.split('-', 1)[1]} {s.generalization_gone:.0%} ({g or 0:.0%})"
        for s, g in zip(final.per_request, gen_after_own)))
    print(f"{final.n_generalization} generalisation probes, {final.n_locality} unrelated sentences; "
          f"edit time {sum(edit_seconds):.1f}s ({sum(edit_seconds) / len(edit_seconds):.1f}s/ticket), total {total:.0f}s")
    if final.locality_changed:
        print("changed unrelated outputs (first 3):")
        for src, b, now in final.locality_changed[:3]:
            print(f"  {src!r}: {b!r} -> {now!r}")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": final.summary(), "hp": hp, "edit_seconds": edit_seconds,
                                            "gen_after_own_edit": gen_after_own,
                                            "tickets": tickets,
                                            "per_request": [s.__dict__ for s in final.per_request]}, indent=1))


if __name__ == "__main__":
    main()

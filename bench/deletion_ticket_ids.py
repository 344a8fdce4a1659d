"""How often the demo's deletion tickets pass their gates, over ticket ids and over draws.

    .venv/bin/python bench/deletion_ticket_ids.py [--n-ids 1] [--first 3] [--ids ID ...] [--salts S ...]

The rank-one editor builds its self-generated variants, and takes its negative examples, from statistics
sentences in an order it draws at random. Until session 49 that draw was seeded by the ticket's ``request_id``, so
the same request under another id (the demo's ids carry the time they were written) was another edit; since then it
is seeded by the request's content (``_draw_seed`` in ``editing/editors/deletion.py``), and every id gives the same
edit. This script deletes the first ``--first`` requests of ``--requests`` one after another (each delta applied
before the next, the editor state carried), as the demo's deletion line does with batches of 1, once per id suffix
(``seed0`` … or the ``--ids`` given, e.g. a demo's stamp) and per ``--salts`` value (the editor's ``draw_salt``:
another draw; the default, no salt, is the editor's own), and prints per ticket the demo line's three gates
(``editing.gates.deletion_gates``, as the flow calls it,
with a deletion line's default ``GateThresholds``): ``deletion_gone``
(the instance no longer gives the unwanted span, bar 1.0), ``unrelated_unchanged`` (the ticket's own locality
sentences translated exactly as by the base model, bar 0.9) and ``retention`` (the earlier tickets' instances still
gone, bar 1.0 on a deletion line; none for the first). Every ticket's delta is applied whether or not it passes, so a later ticket's
figure is after all earlier ones (the demo leaves a rejected one out).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/translator-marian")
    p.add_argument("--requests", default="data/requests/deletions.jsonl")
    p.add_argument("--stats-corpus", default="data/translation/train.jsonl", help="as the demo line's stats_corpus")
    p.add_argument("--first", type=int, default=3, help="requests deleted in sequence (the demo takes 3)")
    p.add_argument("--n-ids", type=int, default=1, help="id suffixes seed0 … seedN-1 (one edit under each)")
    p.add_argument("--ids", nargs="*", default=None, help="id suffixes to use instead (e.g. a demo's stamp)")
    p.add_argument("--salts", nargs="+", default=["", "1", "2", "3", "4", "5", "6", "7"],
                   help="the editor's draw_salt values, each another draw ('' is the editor's own)")
    a = p.parse_args()

    import torch

    from editing.env import configure_offline_defaults

    configure_offline_defaults()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from editing.data.translation import read_deletion_requests
    from editing.editors import get_editor
    from editing.gates import GateThresholds, deletion_gates
    from editing.metrics.deletion import cache_base_outputs
    from editing.models import load

    gates = GateThresholds.from_dict({}, kind="deletion")
    lm = load(a.model)
    model, tok = lm.model, lm.tokenizer
    requests = read_deletion_requests(a.requests)[: a.first]
    base = cache_base_outputs(model, tok, requests)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [(suffix, salt) for suffix in (a.ids if a.ids else [f"seed{i}" for i in range(a.n_ids)])
            for salt in a.salts]
    failed = {r.request_id: 0 for r in requests}
    any_failed = 0
    print("| id suffix (salt) | " + " | ".join(f"{r.request_id}: gone / unrelated / retention" for r in requests)
          + " |")
    print("|---|" + "---|" * len(requests))
    for suffix, salt in runs:
        model.load_state_dict(weights)
        editor = get_editor("rank-one", stats_corpus=a.stats_corpus, draw_salt=salt)
        state, cells, this_failed, earlier = None, [], False, []
        for r in requests:
            ticket = dataclasses.replace(r, request_id=f"{r.request_id}-{suffix}")
            res = editor.edit(model, tok, [ticket], state)
            res.delta.apply(model)
            state = res.state
            report = deletion_gates(model, tok, [ticket], base, gates, earlier=earlier)
            earlier.append(ticket)
            failed[r.request_id] += not report.passed
            this_failed |= not report.passed
            figures = {g.gate: g.metric for g in report.results}
            cells.append(" / ".join("–" if figures[g] is None else f"{figures[g]:.3f}"
                                    for g in ("deletion_gone", "unrelated_unchanged", "retention"))
                         + ("" if report.passed else " (fails)"))
        any_failed += this_failed
        print(f"| {suffix}{f' ({salt})' if salt else ''} | " + " | ".join(cells) + " |", flush=True)
    print()
    print("| ticket | runs where it fails a gate |")
    print("|---|---|")
    for rid, n in failed.items():
        print(f"| {rid} | {n} / {len(runs)} |")
    print(f"| any of them | {any_failed} / {len(runs)} |")


if __name__ == "__main__":
    main()

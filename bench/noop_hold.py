"""Requests the model already answers, in a batch with real edits: are they kept, and what does holding them cost?

A batch mixes ``--edits`` real requests with ``--noops`` requests whose ``target_new`` is set to what the
model already says (``target_true``, top-1 on the prompt): the editor leaves those unedited ("no-op"). With
``hold_noops`` (the default) their keys are held in the solve, ``ΔW k ≈ 0``; without, the batch's update
may move them like any other prompt. For each setting, one batch on the base model (``nse`` with the model's
preset, relations of the request file held as ``editops edit`` does), then: edits taken and no-ops kept
(teacher-forced top-1 of ``target_new``, with the delta applied), and what the editor's diagnostics say.

    OMP_NUM_THREADS=1 .venv/bin/python bench/noop_hold.py                        # SmolLM2, countries
    OMP_NUM_THREADS=1 .venv/bin/python bench/noop_hold.py --model models/factworld-gpt2 \\
        --requests data/requests/factworld.jsonl [--noops-from edited-subjects]
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--requests", default="data/requests/countries.jsonl")
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--noops", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3, help="batches drawn (seeded shuffles of the request file)")
    ap.add_argument("--noops-from", choices=("any", "edited-subjects"), default="any",
                    help="no-ops drawn from the rest of the file, or only from the edited subjects' other facts "
                         "(the prompts an edit is known to disturb most)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from editing.editors import get_editor
    from editing.editors.held_relations import with_relations_held
    from editing.editors.keys import score_targets
    from editing.formats import read_requests
    from editing.models import load

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    loaded = load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    every = read_requests(args.requests)
    rows = []
    for seed in range(args.seeds):
        pool = list(every)
        random.Random(seed).shuffle(pool)
        edits = pool[: args.edits]
        rest = [r for r in pool[args.edits:] if r.target_true]
        if args.noops_from == "edited-subjects":
            rest = [r for r in rest if r.subject in {e.subject for e in edits}]
        known, _ = score_targets(model, tok, [r.text for r in rest], [r.target_true for r in rest])
        noops = [dataclasses.replace(r, request_id=r.request_id + "-noop", target_new=r.target_true)
                 for r, k in zip(rest, known) if k][: args.noops]
        shared = len({r.subject for r in edits} & {r.subject for r in noops})
        for hold in (True, False):
            hp = {"hold_noops": hold}
            editor = with_relations_held("nse", get_editor("nse", **hp), hp, every, model)
            t = time.time()
            res = editor.edit(model, tok, [*edits, *noops], None)
            took_s = time.time() - t
            res.delta.apply(model)
            try:
                taken, _ = score_targets(model, tok, [r.text for r in edits], [r.target_new for r in edits])
                kept, _ = score_targets(model, tok, [r.text for r in noops], [r.target_new for r in noops])
            finally:
                res.delta.remove(model)
            said = {d.request_id: d.succeeded for d in res.diagnostics}
            extra = {d.request_id: d.extra for d in res.diagnostics}
            for r, k in zip(noops, kept):
                if not k:
                    e = extra[r.request_id]
                    print(f"  broken no-op {r.request_id} ({r.relation}, {r.target_new!r}): log P(target) "
                          f"{e['logp_new_before']:.2f} -> {e['logp_new']:.2f}", flush=True)
            rows.append((seed, hold, len(edits), sum(taken), len(noops), sum(kept), shared,
                         sum(said[r.request_id] for r in noops), took_s))
            print(f"seed {seed} hold_noops={hold}: edits taken {sum(taken)}/{len(edits)}, no-ops kept "
                  f"{sum(kept)}/{len(noops)} ({shared} subjects shared with the edits); diagnostics say "
                  f"{sum(said[r.request_id] for r in noops)} kept; {took_s:.0f} s", flush=True)
    print()
    print(f"model {args.model}, requests {args.requests}, {args.edits} edits + {args.noops} no-ops per batch "
          f"(no-ops from: {args.noops_from})")
    print("| seed | hold_noops | edits taken | no-ops kept | distinct subjects of no-ops that an edit edits | "
          "diagnostics: no-ops kept | s |")
    print("|---|---|---|---|---|---|---|")
    for seed, hold, ne, nt, nn, nk, sh, sk, s in rows:
        print(f"| {seed} | {str(hold).lower()} | {nt}/{ne} | {nk}/{nn} | {sh} | {sk}/{nn} | {s:.0f} |")
    for hold in (True, False):
        sel = [r for r in rows if r[1] == hold]
        print(f"| all | {str(hold).lower()} | {sum(r[3] for r in sel)}/{sum(r[2] for r in sel)} | "
              f"{sum(r[5] for r in sel)}/{sum(r[4] for r in sel)} | {sum(r[6] for r in sel)} | "
              f"{sum(r[7] for r in sel)}/{sum(r[4] for r in sel)} | {sum(r[8] for r in sel):.0f} |")


if __name__ == "__main__":
    main()

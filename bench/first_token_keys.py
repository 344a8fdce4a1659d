"""Is a subject that opens the prompt editable at its own token? Keys at the text's first token, and the edits.

A model without a BOS token reads the first token of every text at position 0, where most LMs keep an
attention sink. This probe takes the requests of ``--start``/``--n`` and splits them by where the subject's
last token falls in the bare prompt (``first``: position 0; ``later``). Per edited layer (the model's preset) and
group it prints:

- ``cos_as_written``: mean pairwise cosine of the subjects' keys in the prompt as written (position 0 for ``first``);
- ``cos_mid``: the same subjects' keys mid-sentence (``"The capital of {} is"``);
- ``cost_as_written`` / ``cost_mid``: mean ``kᵀ(C0 + εI)⁻¹k`` under the key statistics (small = many corpus keys
  lie that way, so λ C0 makes writing there expensive).

With ``--edit``, the slice is then edited in batches (λ fixed, ``nse`` defaults, ``--set`` options); printed:
each group's edits that took, and for the first group, its paraphrases with the subject later in the text whose
new target beats the true one (the comparison of the paraphrase metric). One JSON line::

    OMP_NUM_THREADS=1 .venv/bin/python bench/first_token_keys.py --start 113 --n 23 --edit
"""
from __future__ import annotations

import json
import sys
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.para_slice import edit_slice, load_offline, probe_parser, slice_requests  # noqa: E402

MID = "The capital of {} is"


def main(argv: list[str] | None = None) -> None:
    ap = probe_parser(__doc__, 1e4, "SmolLM2's calibration on requests 101-150 chose 1e4", start=113)
    ap.add_argument("--edit", action="store_true", help="also edit the slice and report which edits took")
    args = ap.parse_args(argv)
    loaded = load_offline(args.model)
    import torch
    from dataclasses import replace

    from editing.arch import spec_for
    from editing.editors.hparams import EditHparams, with_preset
    from editing.editors.keys import compute_keys, edit_position
    from editing.stats import corpus_moments

    model, tok = loaded.model, loaded.tokenizer
    spec = spec_for(model)
    reqs = slice_requests(args)
    first = [r for r in reqs if edit_position(tok, r.prompt, r.subject) == 0]
    later = [r for r in reqs if r not in first]
    hp = with_preset(EditHparams(), model)
    if hp.layers is None:
        raise SystemExit(f"{args.model} has no preset (editing/editors/presets.py) naming its edited layers")
    c0 = corpus_moments(model, tok, spec, list(hp.layers), hp.corpus, hp.stats_dir, loaded.fingerprint,
                        progress=False)

    def mean_cos(k: torch.Tensor) -> float | None:
        k = torch.nn.functional.normalize(k, dim=1)
        pairs = [float(k[i] @ k[j]) for i, j in combinations(range(len(k)), 2)]
        return round(sum(pairs) / len(pairs), 3) if pairs else None

    layers = {}
    for l in hp.layers:
        c = c0[l].double()
        inv = torch.linalg.inv(c + 1e-4 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype))
        cost = (lambda k: round(float(torch.einsum("nd,de,ne->n", k, inv, k).mean()), 1))
        row = {}
        for name, rs in (("first", first), ("later", later)):
            if not rs:
                continue
            at = compute_keys(model, tok, spec, rs, l, ("{}",)).double()
            mid = compute_keys(model, tok, spec, [replace(r, prompt=MID) for r in rs], l, ("{}",)).double()
            row[name] = {"cos_as_written": mean_cos(at), "cos_mid": mean_cos(mid), "cost_as_written": cost(at),
                         "cost_mid": cost(mid)}
        layers[str(l)] = row
    out = {"start": args.start, "n": args.n, "subject_first_token": [r.subject for r in first], "layers": layers}
    if args.edit:
        from editing.metrics.facts import score_pairs

        run, seconds = edit_slice(loaded, reqs, args)
        took = {d.request_id: d.succeeded for d in run.diagnostics}
        for name, rs in (("first", first), ("later", later)):
            out[f"took_{name}"] = f"{sum(took[r.request_id] for r in rs)}/{len(rs)}"
        # the first group's paraphrases that do not open with the subject: new target above the true one?
        paras = [(p, r) for r in first for p in r.paraphrases if not p.startswith(r.subject) and r.target_true]
        s = score_pairs(model, tok, [(p, r.target_new) for p, r in paras] + [(p, r.target_true) for p, r in paras])
        wins = sum(s[(p, r.target_new)].logprob_mean > s[(p, r.target_true)].logprob_mean for p, r in paras)
        out["first_paraphrases_subject_later"] = f"{wins}/{len(paras)}"
        out["seconds_per_edit"] = round(seconds / len(reqs), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Fact-editing benchmark: sequential edits in batches, for several editors, against the base model.

One command (defaults: both project models, editors nse, memit and ft, batch sizes 1, 10, 100)::

    .venv/bin/python bench/bench_facts.py [--models smollm2,factworld] [--editors nse,memit,ft]
        [--batch-sizes 1,10,100] [--limit N] [--checkpoints 4] [--threads 1]

For each model the base model's outputs (pair scores, held-out perplexity) are
computed once and cached. Each (model, editor, batch size) runs in a fresh
subprocess (so its peak memory is its own): the model is loaded, the requests
are applied sequentially with :func:`editing.runner.run_sequential`, and at a
few checkpoints the requests edited so far are scored (efficacy, paraphrase,
neighbourhood vs base, retention of the first batch, held-out perplexity drift); the last
checkpoint splits the edits three ways: by checkpoint window (each
window's edits scored right after they were made and again at the end, so edits that never
took well are told from edits that later batches undid), by request relation, and by whether a later
request edits the same subject again (with one record per request in the JSON). Prints the
tables, writes ``bench/results/facts.json`` (``--out``) and, beside it with the suffix ``.png``
(``bench/results/facts.png``), a plot of the metrics against the number of edits; ``--plot`` puts it elsewhere.
``--replot A.json B.json=label … --plot P.png`` measures nothing: it prints the table of runs already written and
plots them together (runs of several commands, e.g. one batch size each, in one figure).
``ft`` tunes the layers that the last ``nse`` run of this benchmark edited on the same
model (recorded per base fingerprint under ``.editops/bench/nse-layers``), so run nse
first or give ``--set layers=[...]``.

``--set blind_siblings=true`` is an ablation of the ``siblings`` option: no subject that
a neighbour probe asks about may serve as a sibling (``sibling_exclude``), so any
neighbourhood gain is generalisation, not the probes' keys held directly.
``relation_prompts`` is every prompt of the request file where ``nse`` holds a subject's other facts
(``other_prompts``, given or the model's preset's), as ``editops edit`` does by default (``--hold-relations``);
``--set hold_relations=false`` leaves them out (before session 41 they were off unless ``--set hold_relations=true``);
``--set hold_relations=true`` where the editor holds no other prompts is an error.

Metric conventions: :mod:`editing.metrics.facts` (probability variants, mean
token log-prob). Seconds per edit = time in ``edit`` + applying the delta,
divided by the number of edits (evaluation excluded; the first batch includes
any one-off key statistics the editor computes, reported separately as
``first_batch_s``). Peak memory = the process's peak RSS while editing (Linux
``VmHWM`` after resetting it once the model and base outputs are loaded), so it
includes the resident model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class BenchModel:
    name: str
    model_dir: str
    requests: str
    heldout: str  # a file, or stdlib:N
    # requests edited when no --limit is given: the fact world's 1,200 requests (100 entities x 12 relations,
    # entity by entity) leave no unedited neighbour at 1,200, so its default is the Bar's 1,000 (entities
    # 84-99 stay as neighbours); a run of all 1,200 reports no neighbourhood at the end (2026-12-02)
    default_limit: int | None = None


MODELS = {
    "smollm2": BenchModel("smollm2", "models/smollm2-135m", "data/requests/countries.jsonl", "stdlib:200"),
    "factworld": BenchModel("factworld", "models/factworld-gpt2", "data/requests/factworld.jsonl",
                            "data/world/heldout.txt", default_limit=1000),
    # the fact world with profile lines (experiment: `python -m editing.training.causal --params params.yaml
    # --section factworld_profiles`)
    "factworld-profiles": BenchModel("factworld-profiles", ".editops/factworld-profiles/model",
                                     ".editops/factworld-profiles/requests.jsonl",
                                     ".editops/factworld-profiles/heldout.txt"),
    # the fact world with biographies (experiment: `... --section factworld_bios`)
    "factworld-bios": BenchModel("factworld-bios", ".editops/factworld-bios/model",
                                 ".editops/factworld-bios/requests.jsonl",
                                 ".editops/factworld-bios/heldout.txt"),
    # a tiny fact model trained on the fly (development; built under .editops/bench/tiny)
    "tiny": BenchModel("tiny", ".editops/bench/tiny/model", ".editops/bench/tiny/requests.jsonl",
                       ".editops/bench/tiny/heldout.txt"),
}
CATALOG_NAMES = {"smollm2": "smollm2-135m", "factworld": "factworld-gpt2"}


def _lookup(name: str) -> BenchModel:
    """A model of :data:`MODELS`, or a directory laid out as :func:`editing.training.causal.build_fact_model`
    writes it (``model/``, ``requests.jsonl``, ``heldout.txt``), named after the directory."""
    if name in MODELS:
        return _resolve(MODELS[name])
    root = Path(name)
    if (root / "model").is_dir():
        return BenchModel(root.name, str(root / "model"), str(root / "requests.jsonl"), str(root / "heldout.txt"))
    raise SystemExit(f"unknown model {name!r}: use one of {', '.join(MODELS)} or a build_fact_model directory")


def _resolve(model: BenchModel) -> BenchModel:
    """Paths from the project catalog (:mod:`editing.catalog`) where it lists the model."""
    if model.name not in CATALOG_NAMES:
        return model
    from editing import catalog

    entry = catalog.get(CATALOG_NAMES[model.name])
    return dataclasses.replace(model, model_dir=str(entry.model_path(ROOT)), requests=str(entry.requests_path(ROOT)))


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _base_outputs(model_name: str, loaded, reqs, held, cache_dir: Path):
    from editing.metrics.facts import BaseOutputs

    path = cache_dir / f"{model_name}-{loaded.fingerprint[:16]}.json"
    if path.is_file():
        base = BaseOutputs.load(path)
        n_new = base.extend(loaded.model, loaded.tokenizer, reqs)
        if not base.measure_heldout(loaded.model, loaded.tokenizer, held) and not n_new:
            return base
    else:
        base = BaseOutputs.compute(loaded.model, loaded.tokenizer, reqs, heldout_texts=held,
                                   model_fingerprint=loaded.fingerprint, progress=True)
    base.save(path)
    return base


NSE_LAYERS_DIR = Path(".editops/bench/nse-layers")


def _nse_layers_path(model_name: str, fingerprint: str) -> Path:
    return NSE_LAYERS_DIR / f"{model_name}-{fingerprint[:16]}.json"


def _nse_layers(model_name: str, fingerprint: str) -> list[int] | None:
    """The layers the last ``nse`` run of this benchmark edited on this model (name and base fingerprint, so a
    rebuilt model never inherits another's layers), for ``ft`` to tune the same ones; None if none ran."""
    path = _nse_layers_path(model_name, fingerprint)
    if not path.is_file():
        return None
    return [int(x) for x in json.loads(path.read_text())["edited_layers"]]


def _remember_nse_layers(model_name: str, fingerprint: str, layers: list[int]) -> None:
    from editing.atomic import write_text_atomic

    path = _nse_layers_path(model_name, fingerprint)
    write_text_atomic(path, json.dumps({"edited_layers": [int(x) for x in layers]}))


def _layers_of(loaded, run) -> list[int]:
    """Layer indices of the weights the run's deltas touched."""
    names = {n for d in run.deltas for n in d.weight_names}
    n_layers = loaded.spec.num_layers(loaded.model.config)
    return [l for l in range(n_layers) if loaded.spec.mlp_out_name(l) + ".weight" in names]


def probe_subject(template: str, prompt: str) -> str | None:
    """The subject that fills ``template`` (one ``{}``) to give ``prompt``, or ``None`` if it does not."""
    head, _, tail = template.partition("{}")
    if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail):
        return prompt[len(head):len(prompt) - len(tail)]
    return None


def _neighbour_subjects(reqs) -> set[str]:
    """Subjects of the neighbour probes, each read against its request's template (:func:`probe_subject`)."""
    return {s for r in reqs for p in r.neighbours if (s := probe_subject(r.prompt, p.prompt)) is not None}


def neighbour_split(done, scores, base, comparison: str) -> dict:
    """Neighbourhood × base of ``done`` with the neighbour probes split by their subject: ``subject edited``
    (this run edited that subject in another prompt: probes of an edited prompt are left out anyway),
    ``subject untouched`` (never edited in the run) and ``subject unread`` (the probe does not follow its
    request's template). ``scores``: the edited model's pair scores (``FactScores.pair_scores``).
    Tells a leak across subjects of a kind from an edit that moves its own subject's other facts."""
    from dataclasses import replace

    from editing.metrics.facts import edited_prompts, score_requests

    edited_subjects = {r.subject for r in done}
    edited = edited_prompts(done)

    def group_of(r, p) -> str | None:   # None: a fact changed on purpose, not locality (left out as in every score)
        if p.prompt in edited:
            return None
        s = probe_subject(r.prompt, p.prompt)
        return "subject unread" if s is None else "subject edited" if s in edited_subjects else "subject untouched"

    groups = [[group_of(r, p) for p in r.neighbours] for r in done]
    out = {}
    for group in ("subject edited", "subject untouched", "subject unread"):
        part = [replace(r, neighbours=tuple(p for p, g in zip(r.neighbours, gs) if g == group))
                for r, gs in zip(done, groups)]
        part = [r for r in part if r.neighbours]
        if not part:
            continue
        rows = score_requests(part, scores, comparison=comparison, edited=edited)
        base_rows = score_requests(part, base.scores, comparison=comparison, edited=edited)
        m = _slice_scores(rows, base_rows)
        out[group] = {"n": m["n"], "n_probes": sum(len(r.neighbours) for r in part),
                      "neighbourhood_ratio": m["neighbourhood_ratio"]}
    return out


def _slice_scores(rows, base_rows) -> dict:
    """Efficacy, paraphrase and neighbourhood × base of some requests' per-request outcomes (``rows``) and
    the same requests' outcomes on the base model (``base_rows``)."""
    from editing.metrics.facts import aggregate

    m, b = aggregate(rows), aggregate(base_rows)
    ratio = m.neighbourhood / b.neighbourhood if m.neighbourhood is not None and b.neighbourhood else None
    return {"n": len(rows), "efficacy": m.efficacy, "paraphrase": m.paraphrase, "neighbourhood_ratio": ratio}


def base_request_rows(s, done, base) -> list:
    """``done``'s per-request outcomes on the base model (``base``: its cached outputs), scored as the checkpoint
    scores ``s`` are (same comparison, the same edited prompts left out)."""
    from editing.metrics.facts import edited_prompts, score_requests

    return score_requests(done, base.scores, comparison=s.comparison, edited=edited_prompts(done))


def split_metrics(s, done, base_rows, windows: list[tuple[int, int]], by_relation: bool) -> tuple[list[dict], dict]:
    """Metrics of slices of the checkpoint scores ``s`` (which cover ``done`` in edit order; ``base_rows``: the
    same requests' outcomes on the base model, :func:`base_request_rows`): each window
    ``(start, end)`` of edits, and with ``by_relation`` each request relation (``relation`` field; requests
    without one under ``"-"``). Scored right after a window was edited this is how well those edits took
    ("when edited"); at the last checkpoint, how well they survived every later batch ("at the end")."""
    rows = s.per_request
    out_windows = [{"start": a, "end": b, **_slice_scores(rows[a:b], base_rows[a:b])} for a, b in windows]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(done if by_relation else ()):
        groups.setdefault(r.relation or "-", []).append(i)
    out_relations = {rel: _slice_scores([rows[i] for i in ix], [base_rows[i] for i in ix])
                     for rel, ix in groups.items()}
    return out_windows, out_relations


def _request_row(r) -> dict:
    return {"efficacy": r.efficacy, "paraphrase": r.paraphrase, "neighbourhood": r.neighbourhood}


def paraphrase_margins(r, pair_scores, comparison: str) -> list[float | None]:
    """Per paraphrase of request ``r``: log P(target_new) − log P(target_true) as the paraphrase metric compares
    them (``comparison``); > 0 is a paraphrase that took. ``None`` where the request has no ``target_true``."""
    from editing.metrics.facts import _lp

    if r.target_true is None:
        return [None] * len(r.paraphrases)
    return [_lp(pair_scores[(p, r.target_new)], comparison) - _lp(pair_scores[(p, r.target_true)], comparison)
            for p in r.paraphrases]


def edited_again_later(done) -> list[bool]:
    """Per request of ``done``: a later request of the run edits the same subject again."""
    last = {r.subject: i for i, r in enumerate(done)}
    return [last[r.subject] > i for i, r in enumerate(done)]


def wording_split(done, fresh_margins, end_margins) -> dict:
    """Paraphrases grouped by wording (the paraphrase with its subject as ``{}``): how many, the share that took
    when edited and at the end, and the share at the end among the requests whose subject a later request edits
    again. Tells which wordings the edits reach and which ones later batches take back."""
    out: dict[str, dict] = {}
    for i, (r, again) in enumerate(zip(done, edited_again_later(done))):
        for p, f, e in zip(r.paraphrases, fresh_margins[i], end_margins[i]):
            if f is None or e is None:
                continue
            g = out.setdefault(p.replace(r.subject, "{}"), {"n": 0, "when_edited": 0, "at_end": 0,
                                                           "n_again": 0, "at_end_again": 0})
            g["n"] += 1
            g["when_edited"] += f > 0
            g["at_end"] += e > 0
            g["n_again"] += again
            g["at_end_again"] += again and e > 0
    return {w: {"n": g["n"], "when_edited": g["when_edited"] / g["n"], "at_end": g["at_end"] / g["n"],
                "n_again": g["n_again"], "at_end_again": g["at_end_again"] / g["n_again"] if g["n_again"] else None}
            for w, g in sorted(out.items(), key=lambda kv: -kv[1]["n"])}


def reedit_split(done, rows, base_rows, fresh_rows, fresh_margins, end_margins) -> tuple[dict, list[dict]]:
    """The edits split by whether a later request of the run edits the same subject again (in another prompt):
    ``subject edited again later`` / ``subject not edited again``, each scored when edited (``fresh_rows``: each
    request's row at the first checkpoint after its batch) and at the end (``rows``), neighbourhood × base from
    ``base_rows``. Tells erosion by the subject's own later edits (one subject-alone key per subject) from erosion
    by the run as a whole. Also returns one record per request (id, subject, relation, edited again later, the
    three metrics when edited and at the end, and its paraphrase margins, :func:`paraphrase_margins`)."""
    again = edited_again_later(done)
    split = {}
    for name, flag in (("subject edited again later", True), ("subject not edited again", False)):
        ix = [i for i, a in enumerate(again) if a == flag]
        if ix:
            split[name] = {"at_end": _slice_scores([rows[i] for i in ix], [base_rows[i] for i in ix]),
                           "when_edited": _slice_scores([fresh_rows[i] for i in ix], [base_rows[i] for i in ix])}
    records = [{"request_id": r.request_id, "subject": r.subject, "relation": r.relation, "edited_again_later": a,
                "when_edited": {**_request_row(f), "paraphrase_margins": fm},
                "at_end": {**_request_row(e), "paraphrase_margins": em}}
               for r, a, f, e, fm, em in zip(done, again, fresh_rows, rows, fresh_margins, end_margins)]
    return split, records


def window_table(row: dict) -> str:
    """Markdown: each checkpoint window's edits when edited and at the end (efficacy / paraphrase / nbhd × base),
    then the end metrics per relation. Tells edits that never took well from edits that later batches undid."""
    final = row["curve"][-1]
    if "windows_at_end" not in final:
        return ""
    f = lambda m: " / ".join(_fmt(m.get(k)) for k in ("efficacy", "paraphrase", "neighbourhood_ratio"))
    fresh = {p["window"]["start"]: p["window"] for p in row["curve"] if "window" in p}
    lines = ["| edits | when edited | at the end |", "|---|---|---|"]
    for w in final["windows_at_end"]:
        lines.append(f"| {w['start'] + 1}–{w['end']} | {f(fresh[w['start']]) if w['start'] in fresh else '-'} "
                     f"| {f(w)} |")
    lines += ["", "| relation | requests | at the end |", "|---|---|---|"]
    lines += [f"| {rel} | {m['n']} | {f(m)} |" for rel, m in final.get("by_relation", {}).items()]
    if final.get("by_reedit"):
        lines += ["", "| edits | requests | when edited | at the end |", "|---|---|---|---|"]
        lines += [f"| {group} | {m['at_end']['n']} | {f(m['when_edited'])} | {f(m['at_end'])} |"
                  for group, m in final["by_reedit"].items()]
    if final.get("by_wording"):
        pct = lambda x: "-" if x is None else f"{x:.3f}"
        lines += ["", "| paraphrase wording | paraphrases | took when edited | at the end | at the end, subject edited "
                  "again later (n) |", "|---|---|---|---|---|"]
        lines += [f"| {w} | {m['n']} | {pct(m['when_edited'])} | {pct(m['at_end'])} | {pct(m['at_end_again'])} "
                  f"({m['n_again']}) |" for w, m in final["by_wording"].items()]
    split = final.get("neighbours_by_subject")
    if split:
        lines += ["", "| neighbour probes | probes | requests | nbhd × base at the end |", "|---|---|---|---|"]
        lines += [f"| {group} | {m['n_probes']} | {m['n']} | {_fmt(m.get('neighbourhood_ratio'))} |"
                  for group, m in split.items()]
    return "\n".join(lines)


def run_one(model: BenchModel, editor_name: str, batch_size: int, limit: int | None, checkpoints: int,
            cache_dir: Path, hparams: dict, heldout: str | None = None, also_heldout: tuple[str, ...] = ()) -> dict:
    """One configuration, in this process: load, edit sequentially, evaluate at checkpoints. Each of
    ``also_heldout`` is a second held-out text whose drift (perplexity / the base's − 1, the base measured here,
    not cached) is reported at every checkpoint under ``drift_also``."""
    import torch

    from editing.editors import get_editor
    from editing.formats import read_requests
    from editing.metrics.facts import evaluate_facts
    from editing.metrics.text import heldout_texts, perplexity
    from editing.models import load
    from editing.runner import run_sequential
    from editing.editors.held_relations import settings_of, with_relations_held

    loaded = load(model.model_dir)
    reqs = read_requests(model.requests, kind="fact", limit=limit or model.default_limit)
    heldout = heldout or model.heldout
    held = heldout_texts(heldout, model=loaded.model, tokenizer=loaded.tokenizer)   # samples:N: the base's own
    base = _base_outputs(model.name, loaded, reqs, held, cache_dir)
    also = {spec: heldout_texts(spec, model=loaded.model, tokenizer=loaded.tokenizer) for spec in also_heldout}
    also_base = {spec: perplexity(loaded.model, loaded.tokenizer, texts) for spec, texts in also.items()}
    n_batches = -(-len(reqs) // batch_size)
    marks = sorted({max(1, round(n_batches * (i + 1) / checkpoints)) for i in range(checkpoints)})
    hparams = dict(hparams)
    hold_relations = hparams.pop("hold_relations", None)   # as `editops edit`: every prompt of the request file
    if hparams.pop("blind_siblings", False):  # ablation: no neighbour probe's subject may serve as a sibling
        hparams["sibling_exclude"] = sorted(_neighbour_subjects(reqs))
    if editor_name == "ft" and "layers" not in hparams:
        layers = _nse_layers(model.name, loaded.fingerprint)  # fine-tune the layers the sequential editor edits
        if layers:
            hparams["layers"] = layers
        else:
            print(f"  [{model.name} ft] no nse run of this benchmark recorded for this model: ft uses its own "
                  "default layers (run nse first, or --set layers=[...])", flush=True)
    editor = get_editor(editor_name, **hparams)
    editor = with_relations_held(editor_name, editor, hparams, reqs, loaded.model, hold_relations)
    first = reqs[:batch_size]
    curve: list[dict] = []
    fresh_rows: list = []   # each request's outcome at the first checkpoint after its batch
    fresh_margins: list = []   # and its paraphrase margins there
    eval_seconds = 0.0

    def on_batch(record) -> None:
        nonlocal eval_seconds
        if record.index not in marks:
            return
        t0 = time.perf_counter()
        done = reqs[: min(len(reqs), record.index * batch_size)]
        final = record.index == n_batches
        s = evaluate_facts(loaded.model, loaded.tokenizer, done, base=base, earlier=first, heldout_texts=held)
        point = {"n_edits": len(done), **s.summary()}
        if also:
            point["drift_also"] = {spec: perplexity(loaded.model, loaded.tokenizer, texts) / also_base[spec] - 1.0
                                   for spec, texts in also.items()}
        eval_seconds += time.perf_counter() - t0
        bounds = [0] + [p["n_edits"] for p in curve] + [len(done)]
        spans = list(zip(bounds, bounds[1:]))
        base_rows = base_request_rows(s, done, base)
        windows, relations = split_metrics(s, done, base_rows, spans if final else spans[-1:], by_relation=final)
        point["window"] = windows[-1]   # the edits since the last checkpoint, when edited
        fresh_rows.extend(s.per_request[len(fresh_rows):])
        fresh_margins.extend(paraphrase_margins(r, s.pair_scores, s.comparison) for r in done[len(fresh_margins):])
        if final:
            point["windows_at_end"], point["by_relation"] = windows, relations
            point["neighbours_by_subject"] = neighbour_split(done, s.pair_scores, base, s.comparison)
            end_margins = [paraphrase_margins(r, s.pair_scores, s.comparison) for r in done]
            point["by_reedit"], point["per_request"] = reedit_split(done, s.per_request, base_rows, fresh_rows,
                                                                    fresh_margins, end_margins)
            point["by_wording"] = wording_split(done, fresh_margins, end_margins)
        curve.append(point)
        print(f"  [{model.name} {editor_name} b={batch_size}] {len(done)} edits: efficacy {s.efficacy:.3f} "
              f"paraphrase {s.paraphrase if s.paraphrase is not None else float('nan'):.3f} "
              f"neighbourhood {s.neighbourhood if s.neighbourhood is not None else float('nan'):.3f} "
              f"retention {s.retention if s.retention is not None else float('nan'):.3f} "
              f"ppl drift {point['perplexity_drift'] if point.get('perplexity_drift') is not None else float('nan'):+.2%}"
              + "".join(f" | drift on {spec} {d:+.2%}" for spec, d in point.get("drift_also", {}).items()),
              flush=True)

    rss_loaded = _rss_mb("VmRSS")
    reset = _reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = run_sequential(loaded.model, loaded.tokenizer, reqs, editor, batch_size, on_batch=on_batch, progress=False,
                         base_fingerprint=loaded.fingerprint)
    final = curve[-1]
    edited_layers = (run.state.meta.get("layers") if run.state is not None else None) or _layers_of(loaded, run)
    if editor_name == "nse" and edited_layers:
        _remember_nse_layers(model.name, loaded.fingerprint, list(edited_layers))
    pre = base.base_scores(reqs).summary()
    return {
        "model": model.name, "editor": editor_name, "batch_size": batch_size, "n_requests": len(reqs),
        "date": time.strftime("%Y-%m-%d"), "requests_file": model.requests, "heldout": heldout,
        "also_heldout": {spec: {"base_perplexity": also_base[spec]} for spec in also},
        # what the edit started from (the model's preset applied)
        "hyperparameters": settings_of(editor, loaded.model) or getattr(editor, "hyperparameters", hparams),
        "edited_layers": edited_layers,
        "lam_used": run.state.meta.get("lam") if run.state is not None else None,  # λ after calibration
        # every hyperparameter as the editor resolved it (corpus, layers, λ, locus), where it keeps them
        "hyperparameters_resolved": run.state.meta.get("hyperparameters") if run.state is not None else None,
        "final": final, "curve": curve, "pre_edit": pre,
        "n_failed_diagnostics": len(run.failed),
        # requests the model already answered when their batch came (not edited; held with hold_noops), and how
        # many of them the batch's other edits changed
        "n_noop": sum(bool(d.extra.get("no_op")) for d in run.diagnostics),
        "n_noop_broken": sum(bool(d.extra.get("no_op")) and not d.succeeded for d in run.diagnostics),
        "seconds_per_edit": run.seconds_per_edit, "edit_seconds": run.edit_seconds,
        "first_batch_s": run.batches[0].seconds if run.batches else None,
        "eval_seconds": eval_seconds,
        "rss_after_load_mb": rss_loaded, "peak_rss_mb": _rss_mb("VmHWM") if reset else None,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _editor_name(r: dict) -> str:
    """The run's editor, with the label ``--replot FILE=LABEL`` gave its file."""
    return r["editor"] + (f" ({r['label']})" if r.get("label") else "")


COLUMNS = [
    ("model", lambda r: r["model"]), ("editor", _editor_name), ("batch", lambda r: r["batch_size"]),
    ("edits", lambda r: r["n_requests"]),
    ("efficacy", lambda r: r["final"].get("efficacy")), ("paraphrase", lambda r: r["final"].get("paraphrase")),
    ("neighbourhood", lambda r: r["final"].get("neighbourhood")),
    ("nbhd/base", lambda r: r["final"].get("neighbourhood_ratio")),
    ("ppl drift", lambda r: r["final"].get("perplexity_drift")),
    ("1st batch kept", lambda r: r["final"].get("retention")),
    ("s/edit", lambda r: r["seconds_per_edit"]), ("peak RSS MB", lambda r: r["peak_rss_mb"]),
]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for name, get in COLUMNS:
            v = get(r)
            cells.append(_fmt(v, 0) if name == "peak RSS MB" and v is not None else _fmt(v, 2 if name == "s/edit" else 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_table(rows: list[dict]) -> str:
    seen, lines = set(), ["| model | requests | efficacy | paraphrase | neighbourhood | perplexity |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["model"] in seen:
            continue
        seen.add(r["model"])
        p = r["pre_edit"]
        lines.append(f"| {r['model']} (before editing) | {r['n_requests']} | {_fmt(p.get('efficacy'))} | "
                     f"{_fmt(p.get('paraphrase'))} | {_fmt(p.get('neighbourhood'))} | {_fmt(p.get('perplexity'), 2)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    metrics = [("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("neighbourhood_ratio", "neighbourhood / base"),
               ("retention", "first batch retained"), ("perplexity_drift", "ppl drift (0.05 = +5 %)")]
    bars = {"efficacy": 0.95, "paraphrase": 0.80, "neighbourhood_ratio": 0.90, "retention": 0.90,
            "perplexity_drift": 0.05}
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(4 * len(metrics), 3.2 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        n_runs = sum(r["model"] == m for r in rows)
        for j, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            # distinct hues up to 10 runs per model, then tab20's light/dark pairs (up to 20 without a repeat)
            ax.set_prop_cycle(color=(plt.cm.tab10 if n_runs <= 10 else plt.cm.tab20).colors)
            for r in rows:
                if r["model"] != m:
                    continue
                xs = [p["n_edits"] for p in r["curve"] if p.get(key) is not None]
                ys = [p[key] for p in r["curve"] if p.get(key) is not None]
                # plotted even without points, so each run has the same colour in every panel as in the legend
                ax.plot(xs, ys, marker="o", label=f"{_editor_name(r)} b={r['batch_size']}")
            ax.axhline(bars[key], color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{m}: {label} (dotted: the Bar)", fontsize=9)
            ax.set_xlabel("number of edits", fontsize=8)
            if key == "perplexity_drift":   # no natural top (a collapsed model's reaches 10⁴): linear to 10 %, log above
                ax.set_yscale("symlog", linthresh=0.1)
                ax.set_ylim(bottom=-0.05)
            else:
                ax.set_ylim(-0.02, 1.05 if key != "neighbourhood_ratio" else 1.25)
            ax.grid(alpha=0.3)
            if j == 0:  # one legend per model row (each row has its own runs)
                ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def _ensure_tiny(model: BenchModel) -> None:
    if Path(model.model_dir).is_dir():
        return
    from editing.training.causal import build_tiny_fact_model

    out = Path(model.model_dir).parent
    build_tiny_fact_model(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,factworld",
                    help="names of MODELS or build_fact_model directories (model/, requests.jsonl, heldout.txt)")
    ap.add_argument("--editors", default="nse,memit,ft")
    ap.add_argument("--batch-sizes", default="1,10,100")
    ap.add_argument("--limit", type=int, default=None,
                    help="requests per model (default: all; factworld: 1000, the Bar's, which leaves neighbours unedited)")
    ap.add_argument("--limit-smollm2", type=int, default=None, help="override --limit for smollm2")
    ap.add_argument("--checkpoints", type=int, default=4, help="evaluation points per run (for the plot)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout", default=None, help="held-out text for the perplexity drift instead of the model's "
                    "(a file, stdlib:N, or samples:N: N texts the unedited model samples itself)")
    ap.add_argument("--also-heldout", action="append", default=[], help="a second held-out text (same forms as "
                    "--heldout) whose drift is also reported at every checkpoint; repeatable")
    ap.add_argument("--set", action="append", default=[], help="editor hyperparameter key=value (all editors)")
    ap.add_argument("--out", default="bench/results/facts.json")
    ap.add_argument("--plot", default=None, help="the plot's path (default: --out with the suffix .png)")
    ap.add_argument("--cache-dir", default=".editops/bench/base-outputs")
    ap.add_argument("--append", action="store_true", help="add to the rows already in --out (e.g. batch size 1 "
                    "measured with a smaller --limit in a second command)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per configuration")
    ap.add_argument("--replot", nargs="+", metavar="JSON", help="measure nothing: read the rows of these result "
                    "files (earlier --out files, paths relative to the repository root; FILE=LABEL names a file's runs "
                    "in the table and the legend), print their table and write one plot of them all to --plot; the "
                    "options that choose or run configurations are not read")
    ap.add_argument("--single", nargs=3, metavar=("MODEL", "EDITOR", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--single-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    os.chdir(ROOT)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from editing.env import configure_offline_defaults

    configure_offline_defaults()
    from flows.cli.edit_cmd import parse_settings

    hparams = parse_settings(args.set)  # as `editops edit --set` reads them

    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot, the path of the plot it writes")
        rows = []
        for spec in args.replot:
            path, label = spec, ""
            if not Path(spec).is_file() and "=" in spec:   # FILE=LABEL (a file whose name holds "=" reads as a file)
                path, _, label = spec.rpartition("=")
            if not Path(path).is_file():
                ap.error(f"--replot: no result file {path!r}")
            rows.extend({**r, "label": label} if label else r for r in json.loads(Path(path).read_text()))
        print(markdown_table(rows))
        plot(rows, Path(args.plot))
        print(f"\nwrote {args.plot}")
        return

    if args.single:
        import torch

        torch.set_num_threads(args.threads)
        name, editor, bs = args.single
        model = _lookup(name)
        limit = args.limit_smollm2 if name == "smollm2" and args.limit_smollm2 else args.limit
        result = run_one(model, editor, int(bs), limit, args.checkpoints, Path(args.cache_dir), hparams,
                         heldout=args.heldout, also_heldout=tuple(args.also_heldout))
        Path(args.single_out).write_text(json.dumps(result, default=str))
        print(window_table(result), flush=True)
        return

    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():  # keep earlier rows, replacing those this run measures again
        rows = json.loads(out.read_text())
    failures = []
    for name in args.models.split(","):
        model = _lookup(name)
        if name == "tiny":
            _ensure_tiny(model)
        if not Path(model.model_dir).is_dir():
            print(f"skip {name}: {model.model_dir} does not exist (build it with `dvc repro`)", flush=True)
            continue
        for editor in args.editors.split(","):
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                # one file per invocation: concurrent bench runs must not read each other's results
                runs_dir = Path(".editops/bench/runs")
                runs_dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f"{model.name}-{editor}-b{bs}-", suffix=".json", dir=runs_dir)
                os.close(fd)
                single_out = Path(tmp)
                single_out.unlink()
                cmd = [sys.executable, __file__, "--single", name, editor, str(bs), "--single-out", str(single_out),
                       "--checkpoints", str(args.checkpoints), "--threads", str(args.threads),
                       "--cache-dir", args.cache_dir]
                if args.limit:
                    cmd += ["--limit", str(args.limit)]
                if args.limit_smollm2:
                    cmd += ["--limit-smollm2", str(args.limit_smollm2)]
                for item in args.set:
                    cmd += ["--set", item]
                if args.heldout:
                    cmd += ["--heldout", args.heldout]
                for spec in args.also_heldout:
                    cmd += ["--also-heldout", spec]
                print(f"== {name} / {editor} / batch {bs}", flush=True)
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, timeout=args.timeout)
                    ok = proc.returncode == 0
                except subprocess.TimeoutExpired:
                    ok = False
                if not ok or not single_out.is_file():
                    failures.append(f"{name}/{editor}/b{bs}")
                    print(f"   FAILED {name}/{editor}/b{bs} after {time.perf_counter() - t0:.0f} s", flush=True)
                    continue
                rows = [r for r in rows if (r["model"], r["editor"], r["batch_size"]) != (name, editor, bs)]
                rows.append(json.loads(single_out.read_text()))
                single_out.unlink()
                out.write_text(json.dumps(rows, indent=1, default=str))
    if not rows:
        print("no configuration ran", failures)
        sys.exit(1)
    print()
    print(base_table(rows))
    print()
    print(markdown_table(rows))
    for r in rows:
        if window_table(r):
            print(f"\n{r['model']} / {r['editor']} / batch {r['batch_size']}:\n{window_table(r)}")
    if failures:
        print("\nfailed:", ", ".join(failures))
    plot_path = Path(args.plot) if args.plot else Path(out).with_suffix(".png")
    plot(rows, plot_path)
    print(f"\nwrote {out} and {plot_path}")


if __name__ == "__main__":
    main()

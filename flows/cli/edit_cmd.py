"""``editops edit`` and ``editops eval``: point editops at a model directory and a request file.

``editops edit`` writes ``--out`` as a plain Hugging Face directory (config,
safetensors weights, tokenizer) that any ``from_pretrained`` loads, plus::

    deltas/batch-0001.safetensors …   one LowRankDelta per batch (sha256-checked)
    editor_state.safetensors          the editor's sequential state after the last batch
    edit_summary.json                 source, base fingerprint, editor, hyperparameters,
                                      per-batch timing, per-request diagnostics, metrics
    base_outputs.json                 the base model's scores (fact requests, with --eval):
                                      ``editops eval --model <out>`` compares with it
    base_deletion_outputs.json        the same for deletion requests (base outputs on
                                      unrelated sources)

``editops eval`` prints the CounterFact metrics table (facts) or the deletion
metrics (deletions). Locality is measured against the base model: ``--base DIR``
(scored once, cached under ``.editops/base-outputs/``) or the ``base_outputs.json``
that ``editops edit`` left in the model directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from flows.cli.app import app

KIND_HELP = "fact or deletion (default: from the request records)"
DELETION_BASE_FILE = "base_deletion_outputs.json"  # the base model's outputs on unrelated sources


def check_kind(kind: str | None) -> None:
    from editing.errors import EditopsError

    if kind not in (None, "fact", "deletion"):
        raise EditopsError(f"--kind {kind!r}: use 'fact' or 'deletion' (or leave it out to read it from the records)")


def parse_layers(text: str | None) -> list[int] | None:
    """``"3,4,5"`` or ``"3-5"`` (or a mix, ``"1,3-5"``) → ``[3, 4, 5]``."""
    from editing.errors import EditopsError

    if not text:
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                layers.extend(range(int(a), int(b) + 1))
            elif part:
                layers.append(int(part))
    except ValueError as exc:
        raise EditopsError(f"--layers {text!r}: give layer numbers like '4,5,6' or '4-6'") from exc
    return layers


def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as JSON where they parse (``2e4``, ``true``, ``[1,2]``)."""
    from editing.errors import EditopsError

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise EditopsError(f"--set {item!r}: write it as key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


HOLD_RELATIONS_HELP = ("where the editor holds a subject's other facts (other_prompts, given or the model's preset's): "
                       "every prompt of the request file is held for each request's subject from the first batch on "
                       "(relation_prompts), not only the relations edited so far")
DEVICE_HELP = "where the model runs: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"
HELDOUT_HELP = ("held-out text for perplexity: a file (one text per line), stdlib:N, or samples:N (N texts the "
                "unedited model samples itself)")


def load_heldout(spec: str | None, model=None, tokenizer=None) -> list[str] | None:
    """The held-out texts of ``spec`` (``samples:N`` are sampled from ``model``, which must be the unedited one)."""
    from editing.metrics.text import heldout_texts

    return heldout_texts(spec, model=model, tokenizer=tokenizer) if spec else None


def default_out(model: str, editor: str) -> Path:
    return Path(".editops") / "edits" / f"{Path(model).name}-{editor}"


def _console():
    from rich.console import Console

    return Console()


def base_outputs_for(base_dir: str, requests, heldout_spec: str | None, cache_dir: Path,
                     mlp_out_template: str | None = None, device: str = "cpu"):
    """The base model's :class:`BaseOutputs` (cached per base fingerprint and extended with missing pairs)
    and the held-out texts of ``heldout_spec`` (``samples:N`` sampled from that base model)."""
    from editing.metrics.facts import BaseOutputs
    from editing.models import load

    loaded = load(base_dir, mlp_out_template=mlp_out_template, device=device)
    heldout = load_heldout(heldout_spec, loaded.model, loaded.tokenizer)
    fp = loaded.fingerprint
    path = cache_dir / f"{fp[:16]}.json"
    if path.is_file():
        base = BaseOutputs.load(path)
        changed = base.extend(loaded.model, loaded.tokenizer, requests) > 0
    else:
        base = BaseOutputs.compute(loaded.model, loaded.tokenizer, requests, model_fingerprint=fp, progress=True)
        changed = True
    changed = base.measure_heldout(loaded.model, loaded.tokenizer, heldout) or changed
    if changed:
        base.save(path)
    return base, heldout


@app.command("edit")
def edit(
    model: str = typer.Option(..., "--model", "-m", help="model directory or hub id"),
    requests: Path = typer.Option(..., "--requests", "-r", help="CounterFact / zsRE / editops / deletion JSON or JSONL"),
    editor: Optional[str] = typer.Option(None, "--editor", "-e", help="memit, nse, ft, hook, rank-one (default: nse for facts, rank-one for deletions)"),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="requests per edit; batches are applied one after another"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (a plain HF model dir + deltas)"),
    kind: Optional[str] = typer.Option(None, "--kind", help=KIND_HELP),
    mlp_out_template: Optional[str] = typer.Option(None, "--mlp-out-template", help="module-name template of the edited matrix, e.g. 'model.layers.{}.mlp.down_proj'"),
    layers: Optional[str] = typer.Option(None, "--layers", help="edited layers, e.g. '3,4,5' or '3-5' (default: the editor's choice)"),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="editor hyperparameter key=value (repeatable)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="only the first N requests"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="score fact requests before and after (base outputs saved)"),
    heldout: Optional[str] = typer.Option(None, "--heldout", help=HELDOUT_HELP),
    state: Optional[Path] = typer.Option(None, "--state", help="continue from a saved editor state"),
    hold_relations: Optional[bool] = typer.Option(None, "--hold-relations/--no-hold-relations",
                                                  help=HOLD_RELATIONS_HELP + " [default: on where it applies]"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Apply requests sequentially in batches and write the edited model, the deltas and the editor state."""
    from editing.editors import DEFAULT_DELETION_EDITOR, DEFAULT_FACT_EDITOR, EditorState, get_editor
    from editing.editors.held_relations import settings_of, with_relations_held
    from editing.formats import read_requests, request_kind
    from editing.metrics.facts import BaseOutputs, evaluate_facts
    from editing.models import load
    from editing.runner import run_sequential

    console = _console()
    check_kind(kind)
    reqs = read_requests(requests, kind=kind, limit=limit)  # type: ignore[arg-type]
    req_kind = request_kind(reqs)
    editor_name = editor or (DEFAULT_FACT_EDITOR if req_kind == "fact" else DEFAULT_DELETION_EDITOR)
    hparams = parse_settings(settings)
    if layers:
        hparams["layers"] = parse_layers(layers)
    ed = get_editor(editor_name, **hparams)
    out_dir = out or default_out(model, editor_name)
    loaded = load(model, mlp_out_template=mlp_out_template, device=device)
    if req_kind == "fact":
        ed = with_relations_held(editor_name, ed, hparams, reqs, loaded.model, hold_relations)
    base_fp = loaded.fingerprint
    console.print(f"[bold]{len(reqs)}[/] {req_kind} requests from {requests} → {loaded.source} "
                  f"({loaded.spec.model_type}, base {base_fp[:12]}…), editor [bold]{editor_name}[/], batch size {batch_size}")
    held = load_heldout(heldout, loaded.model, loaded.tokenizer)   # before any edit: the base's own samples
    base = base_deletions = None
    if evaluate and req_kind == "fact":
        base = BaseOutputs.compute(loaded.model, loaded.tokenizer, reqs, heldout_texts=held, model_fingerprint=base_fp,
                                   progress=progress)
    elif evaluate:
        from editing.metrics.deletion import cache_base_outputs

        base_deletions = cache_base_outputs(loaded.model, loaded.tokenizer, reqs)
    prior = EditorState.load(state, editor=getattr(ed, "name", editor_name)) if state else None
    deltas_dir = out_dir / "deltas"

    def save_delta(record) -> None:
        record.result.delta.save(deltas_dir / f"batch-{record.index:04d}.safetensors")

    run = run_sequential(loaded.model, loaded.tokenizer, reqs, ed, batch_size, state=prior, on_batch=save_delta,
                         progress=progress, base_fingerprint=base_fp)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "source": loaded.source, "base_fingerprint": base_fp, "requests": str(requests), "kind": req_kind,
        "editor": editor_name, "hyperparameters": settings_of(ed, loaded.model) or getattr(ed, "hyperparameters", hparams),
        **run.summary(),
    }
    scores = None
    if base is not None:
        base.save(out_dir / "base_outputs.json")
        scores = evaluate_facts(loaded.model, loaded.tokenizer, reqs, base=base, heldout_texts=held)
        summary["metrics"] = scores.summary()
        summary["base_metrics"] = base.base_scores(reqs).summary()
    deletion_report = None
    if base_deletions is not None:
        from editing.metrics.deletion import evaluate_deletions

        deletion_report = evaluate_deletions(loaded.model, loaded.tokenizer, reqs, base_deletions)
        summary["metrics"] = deletion_report.summary()
        (out_dir / DELETION_BASE_FILE).write_text(json.dumps(base_deletions, indent=1, ensure_ascii=False) + "\n")
    save_model_dir(loaded, out_dir, run, base_fp)
    if run.state is not None:
        run.state.save(out_dir / "editor_state.safetensors")
    (out_dir / "edit_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    console.print(batch_table(run))
    if deletion_report is not None:
        console.print(deletion_table(deletion_report, f"after {len(reqs)} deletions (locality vs the base model)"))
    if scores is not None:
        console.print(scores.table(title=f"after {len(reqs)} edits (locality vs the base model)"))
    failed = run.failed
    if failed:
        ids = ", ".join(d.request_id for d in failed[:8]) + (" …" if len(failed) > 8 else "")
        console.print(f"[bold red]warning: {len(failed)} of {run.n_requests} edits did not take[/] ({ids}); "
                      "see edit_summary.json for each request's loss and residual", highlight=False)
        for line in failure_reasons(failed):
            console.print(f"  {line}", highlight=False, markup=False)
    if scores is not None:
        missed = [r.request_id for r in scores.per_request if not (r.efficacy or r.efficacy_acc)]
        if missed:
            ids = ", ".join(missed[:8]) + (" …" if len(missed) > 8 else "")
            console.print(f"[bold red]warning: after editing, {len(missed)} of {len(reqs)} requests still prefer their "
                          f"old answer on the edit prompt[/] ({ids})", highlight=False)
    console.print(f"wrote {out_dir} (HF model dir), {len(run.batches)} deltas in {deltas_dir}")


def failure_reasons(failed, most: int = 3) -> list[str]:
    """The distinct messages of the requests that did not take, most frequent first (``most`` of them), each
    as ``"<count> × <message>"``: the editor's own reasons (e.g. a subject that is the prompt's first token)."""
    from collections import Counter

    counts = Counter(d.message for d in failed if d.message)
    return [f"{n} × {msg}" for msg, n in counts.most_common(most)]


def save_model_dir(loaded, out_dir: Path, run, base_fp: str) -> None:
    """The edited model as a plain HF directory; hook edits are saved beside base weights (``hooks.safetensors``)."""
    if any(d.kind == "hook" for d in run.deltas):
        from editing.editors.hook import save_hooks
        from editing.editors.hook_module import uninstall_all

        save_hooks(loaded.model, out_dir, base_fingerprint=base_fp)
        uninstall_all(loaded.model)
    loaded.model.save_pretrained(out_dir, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out_dir)


def batch_table(run):
    from rich.table import Table

    meta = run.batches[0].result.delta.meta if run.batches else {}
    where = ", ".join(f"{k} {meta[k]}" for k in ("layers", "lam", "locus", "choice") if meta.get(k) is not None)
    t = Table(title=f"{run.editor}: {run.n_requests} requests in {len(run.batches)} batches of {run.batch_size}"
              + (f" ({where})" if where else ""))
    for col in ("batch", "requests", "took", "mean value loss", "seconds"):
        t.add_column(col, justify="right")
    for b in run.batches:
        losses = [d.value_loss for d in b.result.diagnostics if d.value_loss is not None]
        took = f"{b.n_succeeded}/{len(b.request_ids)}"
        t.add_row(str(b.index), str(len(b.request_ids)), took if b.n_succeeded == len(b.request_ids) else f"[red]{took}[/]",
                  f"{sum(losses) / len(losses):.4f}" if losses else "-", f"{b.seconds:.2f}")
    return t


@app.command("eval")
def eval_(
    model: str = typer.Option(..., "--model", "-m", help="model directory or hub id"),
    requests: Path = typer.Option(..., "--requests", "-r", help="request file (any supported format)"),
    kind: Optional[str] = typer.Option(None, "--kind", help=KIND_HELP),
    base: Optional[str] = typer.Option(None, "--base", help="base model directory: locality, neighbourhood ratio and perplexity drift against it"),
    heldout: Optional[str] = typer.Option(None, "--heldout", help=HELDOUT_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="only the first N requests"),
    fluency_n: int = typer.Option(0, "--fluency", min=0, help="also score fluency of greedy generations from N edit prompts"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics as JSON here"),
    cache_dir: Path = typer.Option(Path(".editops/base-outputs"), "--cache-dir", help="where base outputs are cached"),
    mlp_out_template: Optional[str] = typer.Option(None, "--mlp-out-template"),
    comparison: str = typer.Option("mean", "--comparison", help="compare mean (CounterFact) or sum of target token log-probs"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Print the CounterFact metrics (facts) or deletion metrics (deletions) of a model on a request file."""
    from editing.formats import read_requests, request_kind
    from editing.metrics.facts import BaseOutputs, evaluate_facts
    from editing.models import load

    console = _console()
    check_kind(kind)
    reqs = read_requests(requests, kind=kind, limit=limit)  # type: ignore[arg-type]
    req_kind = request_kind(reqs)
    loaded = load(model, mlp_out_template=mlp_out_template, device=device)
    if (Path(model) / "hooks.safetensors").is_file():  # a hook-editor output: install its hooks
        from editing.editors.hook import load_hooks

        load_hooks(loaded.model, model)
    if req_kind == "deletion":
        _eval_deletions(console, loaded, reqs, base, json_out, device)
        return
    base_outputs = None
    origin = "none: the model is scored on its own (base metrics)"
    held = None if base else load_heldout(heldout)   # samples:N needs --base: they are the unedited model's
    if base:
        base_outputs, held = base_outputs_for(base, reqs, heldout, cache_dir, mlp_out_template=mlp_out_template,
                                              device=device)
        origin = f"base model {base}"
    elif (Path(model) / "base_outputs.json").is_file():
        base_outputs = BaseOutputs.load(Path(model) / "base_outputs.json")
        origin = f"{Path(model) / 'base_outputs.json'} (written by editops edit)"
        if base_outputs.missing(reqs):
            console.print("[yellow]the cached base outputs do not cover these requests; pass --base to score them[/]")
            base_outputs = None
        elif not base_outputs.covers_heldout(held):
            console.print("[yellow]the cached base perplexity is for other held-out text; pass --base for drift[/]")
            base_outputs.perplexity = None
    prompts = [r.text for r in reqs[:fluency_n]] if fluency_n else None
    scores = evaluate_facts(loaded.model, loaded.tokenizer, reqs, base=base_outputs, heldout_texts=held,
                            fluency_prompts=prompts, progress=True, comparison=comparison)  # type: ignore[arg-type]
    console.print(scores.table(title=f"{Path(loaded.source).name}: {len(reqs)} fact requests from {requests.name}"))
    console.print(f"[dim]locality reference: {origin}[/]", highlight=False)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"model": loaded.source, "requests": str(requests), **scores.summary()},
                                       indent=2) + "\n")


def deletion_table(report, title: str):
    """A rich table of a :class:`editing.metrics.deletion.DeletionReport`."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("definition", style="dim")
    defs = {"instance_gone": "unwanted output gone on the request's own source",
            "generalization_gone": f"gone on {report.n_generalization} unseen sources with the same trigger",
            "locality_exact": f"{report.n_locality} unrelated outputs identical to the base model's",
            "chrf": "chrF of unrelated outputs against references", "base_chrf": "the same for the base model"}
    for k, v in report.summary().items():
        if v is not None:
            t.add_row(k, f"{v:.4f}" if k not in ("chrf", "base_chrf") else f"{v:.2f}", defs.get(k, ""))
    return t


def _eval_deletions(console, loaded, reqs, base: str | None, json_out: Path | None, device: str = "cpu") -> None:
    """Deletion metrics (``editing.metrics.deletion``): behaviour gone on the instance and on unseen
    triggers, unrelated outputs unchanged versus the base model (``--base``), chrF against references."""
    from editing.metrics.deletion import cache_base_outputs, evaluate_deletions
    from editing.models import load

    base_outputs = None
    if base:
        b = load(base, device=device)
        base_outputs = cache_base_outputs(b.model, b.tokenizer, reqs)
        del b
    elif (Path(loaded.source) / DELETION_BASE_FILE).is_file():
        cached = json.loads((Path(loaded.source) / DELETION_BASE_FILE).read_text())
        wanted = {p.source for r in reqs for p in r.locality}
        if wanted <= set(cached):
            base_outputs = cached
            console.print(f"[dim]locality reference: {DELETION_BASE_FILE} (written by editops edit)[/]")
    report = evaluate_deletions(loaded.model, loaded.tokenizer, reqs, base_outputs)
    console.print(deletion_table(report, f"{Path(loaded.source).name}: {report.n_requests} deletion requests"))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"model": loaded.source, **report.to_dict()}, indent=2, default=str) + "\n")

"""``editops demo``: the whole story on the project's own models, printing what it does.

1. builds the default models if missing (``dvc repro``: SmolLM2-135M + country facts,
   the translation model + its deletion requests);
2. writes a demo config (two model lines) and drops sample tickets into the inbox:
   real country facts for SmolLM2 (JSONL, one relation after another), behaviour deletions for the translation
   model (YAML) and a few malformed tickets (CSV);
3. runs the ``process_requests`` flow (Prefect, no server needed: an ephemeral one);
4. shows the ledger, the versions with their gate results and diffs, the champion;
5. prints where to look (MLflow UI command, outbox, quarantine, ledger).

Everything lives under ``--workdir`` (default ``.editops/demo``): sqlite ledger,
sqlite MLflow with local artifacts, inbox/outbox/quarantine.
"""
from __future__ import annotations

import json
import time
from itertools import zip_longest
from pathlib import Path

from rich.console import Console

from editing.errors import EditopsError


def _step(con: Console, n: int, text: str) -> None:
    con.rule(f"[bold cyan]{n}. {text}")


def _build(con: Console, entry, root: Path, build: bool) -> bool:
    from flows.build import repro

    if entry.is_built(root) and entry.requests_path(root).is_file():
        con.print(f"  {entry.name}: built ({entry.model_dir}, {entry.request_count(root)} requests)")
        return True
    if not build:
        con.print(f"  {entry.name}: [yellow]not built[/] and --skip-build given; its line is left out")
        return False
    stages = list(dict.fromkeys([entry.stage, entry.requests_stage]))
    con.print(f"  {entry.name}: building with [bold]dvc repro {' '.join(stages)}[/] …")
    t0 = time.perf_counter()
    p = repro(stages, root, capture=True)
    if p.returncode != 0 or not entry.is_built(root):
        con.print(f"  [red]{entry.name}: build failed[/] ({p.stderr.strip().splitlines()[-1:] or ''}); its line is left out")
        return False
    con.print(f"  {entry.name}: built in {time.perf_counter() - t0:.0f} s")
    return True


def _read_jsonl(path: Path, n: int | None = None) -> list[dict]:
    """The file's first ``n`` rows (all of them when ``n`` is None)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if n is not None and len(out) >= n:
                break
            if line.strip():
                out.append(json.loads(line))
    return out


def _one_per_relation(path: Path, n: int) -> list[dict]:
    """``n`` requests of the file taken round-robin over its relations (in the order each relation first appears,
    each relation's requests in file order), so the demo's tickets change several kinds of fact, not only the
    file's first relation; rows without a ``relation`` count as one relation."""
    by_relation: dict[str, list[dict]] = {}
    for row in _read_jsonl(path):
        by_relation.setdefault(str(row.get("relation", "")), []).append(row)
    rounds = zip_longest(*by_relation.values())     # round i: each relation's i-th request, None where it has none
    return [row for rnd in rounds for row in rnd if row is not None][:n]


def run_demo(workdir: str = ".editops/demo", *, build: bool = True, n_facts: int = 6, n_deletions: int = 3,
             engine: str = "prefect") -> None:
    import yaml

    from editing import catalog
    from flows.config import LineConfig, ProjectConfig, write_config
    from flows.ledger import Ledger
    from flows.pipeline import open_registry, run_once

    con = Console()
    root = catalog.project_root()
    wd = (root / workdir).resolve()
    t_start = time.perf_counter()

    _step(con, 1, "project models (built by DVC when missing)")
    facts_e, mt_e = catalog.get("smollm2-135m"), catalog.get("translator-marian")
    have_facts = _build(con, facts_e, root, build)
    have_mt = _build(con, mt_e, root, build)
    if not (have_facts or have_mt):
        raise EditopsError("no project model could be built; run `dvc repro` and look at its output")

    _step(con, 2, "model lines and sample tickets")
    lines: dict[str, LineConfig] = {}
    if have_facts:
        lines[facts_e.line] = LineConfig(name=facts_e.line, base_model=str(facts_e.model_path(root)), kind="fact",
                                         editor="nse", batch_size=3, allowed_requesters=["analyst", "editor-bot"],
                                         promotion="auto", heldout="stdlib:32")
    if have_mt:
        lines[mt_e.line] = LineConfig(name=mt_e.line, base_model=str(mt_e.model_path(root)), kind="deletion",
                                      editor="rank-one", batch_size=1, allowed_requesters=["*"], promotion="auto",
                                      hyperparameters={"stats_corpus": str(catalog.resolve(mt_e.stats_corpus, root))}
                                      if mt_e.stats_corpus else {})
    cfg = ProjectConfig(root=wd, workdir=wd, lines=lines, ledger_url=f"sqlite:///{wd}/ledger.db",
                        tracking_uri=f"sqlite:///{wd}/mlflow.db", artifact_root=wd / "artifacts")
    cfg_path = write_config(cfg, wd / "editops.yaml")
    cfg.ensure_dirs()
    con.print(f"  config: {cfg_path}")
    for l in lines.values():
        con.print(f"  line [bold]{l.name}[/]: {l.kind}, editor {l.editor}, batches of {l.batch_size}, "
                  f"requesters {l.allowed_requesters}, promotion {l.promotion}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    good_facts: list[dict] = []
    if have_facts:
        for r in _one_per_relation(facts_e.requests_path(root), n_facts):
            r.pop("kind", None)
            good_facts.append({**r, "request_id": f"{r['request_id']}-{stamp}", "line": facts_e.line,
                               "requester": "analyst", "kind": "fact"})
        p = cfg.inbox / "country-facts.jsonl"
        p.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in good_facts), encoding="utf-8")
        relations = list(dict.fromkeys(str(t.get("relation", "")) for t in good_facts))
        con.print(f"  {p.name}: {len(good_facts)} country-fact tickets ({', '.join(relations)}), e.g. "
                  f"“{good_facts[0]['prompt'].replace('{}', good_facts[0]['subject'])} → {good_facts[0]['target_new']}”")
    if have_mt:
        dels = []
        for r in _read_jsonl(mt_e.requests_path(root), n_deletions):
            r.pop("kind", None)
            dels.append({**r, "request_id": f"{r['request_id']}-{stamp}", "line": mt_e.line, "requester": "qa-team",
                         "kind": "deletion"})
        p = cfg.inbox / "behaviour-deletions.yaml"
        p.write_text(yaml.safe_dump(dels, allow_unicode=True, sort_keys=False), encoding="utf-8")
        con.print(f"  {p.name}: {len(dels)} behaviour-deletion tickets, e.g. "
                  f"“{dels[0]['source']}” must not give “{dels[0]['unwanted']}”")
    bad_line = facts_e.line if have_facts else mt_e.line
    malformed = (
        "request_id,line,requester,subject,prompt,target_new,priority\n"
        f"bad-missing-{stamp},{bad_line},analyst,France,The capital of {{}} is,,1\n"
        f"bad-requester-{stamp},{bad_line},mallory,Spain,The capital of {{}} is,Rome,1\n"
        f"bad-priority-{stamp},{bad_line},analyst,Peru,The capital of {{}} is,Oslo,urgent\n"
        f"bad-subject-{stamp},{bad_line},analyst,Chile,The capital of Japan is,Lima,1\n"
    )
    if good_facts:
        g = good_facts[0]
        malformed += (f"bad-contradiction-{stamp},{bad_line},analyst,{g['subject']},\"{g['prompt']}\","
                      f"Nowhere{stamp[-4:]},1\n")
    (cfg.inbox / "malformed.csv").write_text(malformed, encoding="utf-8")
    con.print(f"  malformed.csv: {malformed.count(chr(10)) - 1} malformed tickets (missing target, requester not "
              "allowed, bad priority, subject not in prompt, a contradiction)")

    _step(con, 3, f"the flow: intake → edit → gates → register → ledger → promote (engine: {engine})")
    if engine == "prefect":
        con.print("  (Prefect starts a temporary local server for this process: 10–20 s)")
    t0 = time.perf_counter()
    run_once(str(cfg_path) if engine == "prefect" else cfg, engine=engine)
    con.print(f"  flow finished in {time.perf_counter() - t0:.0f} s")

    _step(con, 4, "the ledger")
    from flows.cli.tickets_cmd import tickets as tickets_cmd

    tickets_cmd(config=str(cfg_path), state=None, line=None, limit=50)

    _step(con, 5, "versions, gate results, diffs, champion")
    from flows.cli.registry_cmd import version_lines
    from registry.reports import version_diff

    reg = open_registry(cfg)
    for name in lines:
        if not reg.line_exists(name):
            continue
        con.print(f"[bold]line {name}[/]: versions, measured gate figures, diff vs parent "
                  f"(as a table: editops versions {name} --config {cfg_path})")
        for text in version_lines(reg, name):
            con.print("  " + text, highlight=False)
        versions = reg.versions(name)
        for v in versions[1:]:
            d = version_diff(reg, v)
            changed = d.changed_probes if d is not None else []
            if changed:
                con.print(f"  v{v.number} changed the top answer of {len(changed)} of {len(d.probes)} probes: " + "; ".join(
                    f"“{p.prompt}” {p.top_a!r} → {p.top_b!r}" for p in changed[:3]) + (" …" if len(changed) > 3 else ""),
                    highlight=False)
        if len(versions) > 1:
            head = versions[-1]
            diff = reg.diff(name, versions[0].number, head.number, behaviour=False)
            con.print(f"[bold]net diff base v{diff.a} → head v{diff.b}[/]: " + ", ".join(
                f"{x.weight} ‖ΔW‖={x.norm:.3g} rank {x.rank}" for x in diff.layers[:4]))
        champ = reg.alias_version(name, "champion")
        con.print(f"  champion of {name}: v{champ}" if champ else f"  {name}: no champion yet")
    _step(con, 6, "where to look")
    con.print(f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///{wd}/mlflow.db --port 5000 "
              "--host 127.0.0.1   (then open http://127.0.0.1:5000)")
    con.print(f"  ledger:      editops tickets --config {cfg_path}")
    con.print(f"  versions:    editops versions <line> --config {cfg_path}   (gate figures, diffs, aliases)")
    con.print(f"  one version: editops show <line>@champion --config {cfg_path}   (every gate per ticket, artifacts)")
    con.print(f"  outbox:      {cfg.outbox}  (one JSON outcome per ticket)")
    con.print(f"  quarantine:  {cfg.quarantine}  (invalid rows with machine-readable reasons)")
    con.print(f"  promote / roll back: editops promote <line> <version> --config {cfg_path} · "
              f"editops rollback <line> --config {cfg_path}")
    con.print(f"[bold green]demo done in {time.perf_counter() - t_start:.0f} s[/]")

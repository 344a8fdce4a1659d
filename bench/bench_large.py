"""One batch of fact edits on large models built from config (random weights), on the CPU and on a GPU.

One command::

    .venv/bin/python bench/bench_large.py [--shapes llama-1b,gpt2-xl] [--devices cpu,cuda]
        [--editors nse,memit] [--batch-size 10] [--stats-texts 256] [--threads N] [--out FILE]

For each device and shape a model is built from its config with seeded random weights in float32
(the transformer stack has the reference model's shapes; the vocabulary is the tokenizer's,
SmolLM2's 49,152 by default). Then, timed separately:

- ``stats_s``: the key statistics ``C0`` of the edited layers over ``--stats-texts`` texts of the
  standard library's docstrings (≤ 128 tokens each, :func:`editing.stats.corpus_moments`), computed
  once per model in practice, reported with tokens per second;
- ``batch_s``: one ``edit`` of the first ``--batch-size`` countryinfo requests by a fresh editor
  (no earlier state), the statistics cached: value optimisation, keys, solves, repasses and
  diagnostics, as each later batch of a sequential run costs. The layers and λ are given
  (GPT-2 XL: MEMIT's preset; Llama-1B: Llama-3-8B's AlphaEdit layers scaled to depth), so no
  causal trace or λ calibration runs (on random weights they measure nothing).

Random weights make efficacy meaningless; this measures time and memory only. Peak memory:
process RSS (Linux ``VmHWM``, includes the resident model) and, on a GPU, torch's peak allocation.
Before timing on a CUDA device, ``tests/editing/test_device.py`` (every editor on the GPU against
the CPU) can be run with ``--check``. Prints a table and writes ``--out`` (JSON rows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_facts import _reset_peak_rss, _rss_mb  # noqa: E402  (peak RSS: Linux VmHWM, reset per model)


@dataclass(frozen=True)
class Shape:
    name: str
    family: str          # "llama" or "gpt2"
    config: dict
    layers: tuple[int, ...]
    lam: float
    note: str


SHAPES = {
    "llama-1b": Shape("llama-1b", "llama",
                      dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0,
                           tie_word_embeddings=True),
                      (2, 3, 4, 5, 6), 1.5e4, "Llama-3.2-1B shapes; layers: Llama-3-8B's 4–8 of 32 at half depth"),
    "gpt2-xl": Shape("gpt2-xl", "gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024),
                     (13, 14, 15, 16, 17), 2e4, "GPT-2 XL shapes; MEMIT's preset layers and λ"),
    # a small stand-in to check this script in seconds
    "llama-tiny": Shape("llama-tiny", "llama",
                        dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
                        (1, 2), 1.5e4, "development"),
    "gpt2-tiny": Shape("gpt2-tiny", "gpt2", dict(n_embd=128, n_layer=4, n_head=4, n_positions=512),
                       (1, 2), 2e4, "development"),
}


def build_model(shape: Shape, vocab_size: int, device: str, seed: int = 0):
    """The shape's model with seeded random weights, built directly on ``device`` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    cfg_cls = LlamaConfig if shape.family == "llama" else GPT2Config
    ids = dict(bos_token_id=0, eos_token_id=0) if shape.family == "gpt2" else dict(bos_token_id=1, eos_token_id=2)
    cfg = cfg_cls(vocab_size=vocab_size, **ids, **shape.config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


class PhaseTimer:
    """Wall time spent inside named functions of :mod:`editing.editors.memit` (the functions themselves run,
    wrapped by a timer): the value optimisation (``compute_values``) and the closed-form solves
    (``memit_factors``, ``alphaedit_factors``), the model's sibling lists (``sibling_requests``, generated) and
    context prefixes (``_generated_templates``, generated on a line's first batch); the rest of a batch is keys,
    residuals, scoring and repass checks."""

    PHASES = {"values_s": ("compute_values",), "solve_s": ("memit_factors", "alphaedit_factors"),
              "siblings_s": ("sibling_requests",), "context_s": ("_generated_templates",)}

    def __init__(self, device: str) -> None:
        self.device, self.seconds = device, {k: 0.0 for k in self.PHASES}

    def __enter__(self) -> "PhaseTimer":
        import editing.editors.memit as memit

        self._saved = {}
        for phase, names in self.PHASES.items():
            for name in names:
                fn = getattr(memit, name)
                self._saved[name] = fn
                setattr(memit, name, self._timed(phase, fn))
        return self

    def _timed(self, phase: str, fn):
        def run(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds[phase] += time.perf_counter() - t0
        return run

    def __exit__(self, *exc) -> None:
        import editing.editors.memit as memit

        for name, fn in self._saved.items():
            setattr(memit, name, fn)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stdlib_corpus(n: int, path: Path) -> str:
    """The first ``n`` standard-library docstrings (:mod:`editing.stats`) written to ``path``: a ``file:`` corpus."""
    from editing.stats import _stdlib_docstrings

    texts = [" ".join(t.split()) for t in _stdlib_docstrings()[:n]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(texts) + "\n")
    return f"file:{path}"


def run_shape(shape: Shape, device: str, editors: list[str], requests, tokenizer, corpus: str, stats_dir: Path,
              sets: dict, on_row) -> None:
    """Build ``shape`` on ``device``, time its C0 and one batch per editor; ``on_row(row)`` after each editor."""
    import torch

    from editing.arch import get_module, in_out_features, spec_for
    from editing.editors import get_editor
    from editing.stats import corpus_moments

    _reset_peak_rss()   # each shape's peak is its own
    t0 = time.perf_counter()
    model = build_model(shape, len(tokenizer), device)
    _sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    spec = spec_for(model)
    fp = f"random-{shape.name}-seed0"   # stats are keyed by it; hashing 5 GB of random weights measures nothing
    with torch.no_grad():   # warm-up: CUDA context, kernels, allocator
        model(input_ids=torch.tensor([[1, 2, 3]], device=device))
    _sync(device)
    stats_dir = stats_dir / device.replace(":", "_")
    t0 = time.perf_counter()
    corpus_moments(model, tokenizer, spec, list(shape.layers), corpus, stats_dir, fp, progress=False)
    _sync(device)
    stats_s = time.perf_counter() - t0
    texts = [t for t in Path(corpus[5:]).read_text().splitlines() if t]
    n_tokens = sum(min(len(tokenizer(t)["input_ids"]), 128) for t in texts)
    d_ff = in_out_features(get_module(model, spec.mlp_out_name(shape.layers[0])))[0]
    for name in editors:
        hp = {"layers": list(shape.layers), "lam": shape.lam, "locus": "subject", "corpus": corpus,
              "stats_dir": str(stats_dir), **sets.get(name, {})}
        ed = get_editor(name, base_fingerprint=fp, **hp)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        with PhaseTimer(device) as phases:
            t0 = time.perf_counter()
            res = ed.edit(model, tokenizer, requests, None)
            _sync(device)
            batch_s = time.perf_counter() - t0
        meta = res.delta.meta
        row = {
            "shape": shape.name, "device": device, "editor": name, "params_m": round(n_params / 1e6, 1),
            "d_ff": d_ff, "layers": list(shape.layers), "batch_size": len(requests), "build_s": round(build_s, 2),
            "stats_texts": len(texts), "stats_tokens": n_tokens,
            "stats_s": round(stats_s, 2), "stats_tokens_per_s": round(n_tokens / stats_s),
            "batch_s": round(batch_s, 2), "s_per_edit": round(batch_s / len(requests), 3),
            **{k: round(v, 2) for k, v in phases.seconds.items()},
            "repassed": sum(len(x) for x in meta.get("repassed", [])),
            "rank": max((res.delta.rank(n) for n in res.delta.weight_names), default=0),
            "peak_rss_mb": round(_rss_mb("VmHWM") or 0), "peak_cuda_mb":
                round(torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None,
            "note": shape.note,
        }
        print(json.dumps(row), flush=True)
        on_row(row)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict]) -> str:
    head = ("| shape | device | editor | params (M) | batch | C0: texts / tokens / s | batch s | values s | solves s "
            "| siblings s | prefixes s | s/edit | repassed | peak RSS MB | peak GPU MB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['device']} | {r['editor']} | {r['params_m']:.0f} | {r['batch_size']} | "
                     f"{r['stats_texts']} / {r['stats_tokens']} / {r['stats_s']:.1f} | {r['batch_s']:.1f} | "
                     f"{r['values_s']:.1f} | {r['solve_s']:.1f} | {r['siblings_s']:.1f} | {r['context_s']:.1f} | "
                     f"{r['s_per_edit']:.2f} | {r['repassed']} | {r['peak_rss_mb']} | "
                     f"{r['peak_cuda_mb'] if r['peak_cuda_mb'] is not None else '–'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-1b,gpt2-xl")
    ap.add_argument("--devices", default="cpu,cuda" if _cuda() else "cpu")
    ap.add_argument("--editors", default="nse,memit")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--stats-texts", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the SmolLM2 model's)")
    ap.add_argument("--requests", default=None, help="request file (default: the countryinfo requests)")
    ap.add_argument("--set", action="append", default=[], metavar="EDITOR:KEY=VALUE",
                    help="an editor hyperparameter, e.g. nse:repasses=0")
    ap.add_argument("--check", action="store_true", help="first run tests/editing/test_device.py on the GPU")
    ap.add_argument("--work", default=".editops/bench/large", help="the corpus file (and, while running, the key statistics)")
    ap.add_argument("--out", default="bench/results/large.json")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from editing.formats import read_requests
    from flows.cli.edit_cmd import parse_settings

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(ROOT / "tests/editing/test_device.py")], cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"tests/editing/test_device.py failed (rc {proc.returncode}): not timing")
    tok_dir = args.tokenizer
    req_path = args.requests
    if tok_dir is None or req_path is None:
        from editing import catalog

        entry = catalog.get("smollm2-135m")
        tok_dir = tok_dir or str(entry.model_path(ROOT))
        req_path = req_path or str(entry.requests_path(ROOT))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    requests = read_requests(req_path, kind="fact", limit=args.batch_size)
    work = Path(args.work)
    corpus = stdlib_corpus(args.stats_texts, work / f"stdlib-{args.stats_texts}.txt")
    sets: dict[str, dict] = {}
    for item in args.set:   # EDITOR:KEY=VALUE, the value read as `editops edit --set` reads it
        ed, kv = item.split(":", 1)
        sets.setdefault(ed, {}).update(parse_settings([kv]))
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(row: dict) -> None:   # after every row: a run stopped at a time limit keeps what it measured
        rows.append(row)
        out.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                  indent=1) + "\n")

    for device in args.devices.split(","):
        for shape in args.shapes.split(","):
            with tempfile.TemporaryDirectory(dir=work) as stats_dir:   # C0 computed afresh, so stats_s is measured
                run_shape(SHAPES[shape], device, args.editors.split(","), requests, tokenizer, corpus,
                          Path(stats_dir), sets, on_row=save)
    print(json.dumps(machine()))
    print(table(rows))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()

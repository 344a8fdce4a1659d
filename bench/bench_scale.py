"""Time one editing batch on a large model built from config (random weights), on CPU and, where present, GPU.

    python bench/bench_scale.py [--shape llama-1b] [--batch 10] [--devices cuda,cpu] [--tokenizer DIR]

The model has Llama-3.2-1B's shapes (16 layers, d_model 2048, d_ff 8192, GQA 32/8 heads)
with the tokenizer's vocabulary (default SmolLM2's, 49,152 tokens), seeded random
weights, float32. Requests are synthetic capital facts (random weights know no facts:
this measures cost, not quality). For each device: the one-off key statistics C0 of the
edited layers (``samples:N``, computed once, on the first device, and reused from the
stats cache by the next: same weights, same fingerprint) and one ``nse`` batch
(generated context templates, 25 value steps at most, fixed λ, layers 4–8). Prints a
table and writes ``bench/results/scale.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0),
}
SUBJECTS = ["Avalor", "Brimsey", "Cordania", "Dunmere", "Estoria", "Falwen", "Gorsk", "Hallin", "Ivrea", "Jastmark",
            "Kelmor", "Lunet", "Morvia", "Nerast", "Ostrel", "Pallan"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Dublin", "Vienna", "Madrid", "Berlin", "Athens",
          "Warsaw", "Lisbon", "Prague", "Sofia", "Riga"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--tokenizer", default="models/smollm2-135m")
    ap.add_argument("--corpus", default="samples:32")
    ap.add_argument("--out", default="bench/results/scale.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from editing.arch import spec_for
    from editing.editors import get_editor
    from editing.requests import FactRequest
    from editing.stats import corpus_moments
    from editing.editors.memit import base_fingerprint

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **SHAPES[args.shape])
    model = LlamaForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    reqs = [FactRequest(f"s{i}", "The capital of {} is", SUBJECTS[i % len(SUBJECTS)] + ("" if i < 16 else str(i)),
                        CITIES[(i + 3) % len(CITIES)], CITIES[i % len(CITIES)]) for i in range(args.batch)]
    layers = (4, 5, 6, 7, 8)
    stats_dir = tempfile.mkdtemp(prefix="scale-stats-")
    rows = []
    fp = base_fingerprint(model)
    spec = spec_for(model)
    for dev in [d for d in args.devices.split(",") if d]:
        if dev == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: skipping cuda")
            continue
        model.to(dev)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        corpus_moments(model, tok, spec, list(layers), args.corpus, stats_dir, fp, progress=False)
        c0_s = time.perf_counter() - t
        ed = get_editor("nse", layers=layers, lam=1.5e4, corpus=args.corpus, stats_dir=stats_dir,
                        base_fingerprint=fp)
        t = time.perf_counter()
        res = ed.edit(model, tok, reqs, None)
        if dev == "cuda":
            torch.cuda.synchronize()
        edit_s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
        name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        rows.append({"device": name, "params_M": round(n_params / 1e6), "batch": args.batch, "c0_s": round(c0_s, 1),
                     "edit_s": round(edit_s, 1), "s_per_edit": round(edit_s / args.batch, 2),
                     "gpu_peak_GiB": round(peak, 2) if peak is not None else None,
                     "rank": max(u.shape[1] for u, _ in res.delta.factors.values())})
        print(rows[-1], flush=True)
    print(f"\n{args.shape} ({n_params / 1e9:.2f} B params, random weights), nse batch of {args.batch}, layers {layers}")
    print(f"{'device':40s} {'C0 s':>8s} {'edit s':>8s} {'s/edit':>8s} {'GPU peak GiB':>13s}")
    for r in rows:
        print(f"{r['device']:40s} {r['c0_s']:8.1f} {r['edit_s']:8.1f} {r['s_per_edit']:8.2f} {str(r['gpu_peak_GiB']):>13s}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

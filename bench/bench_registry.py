"""Registry benchmark: storage per version, materialisation time vs chain length, export round trip.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_registry.py [--model models/smollm2-135m] [--chain 100]

Uses the default 135M model directory when it exists, else a Llama of the same
shape built from SmolLM2-135M's config (random weights; timings are the same).
Deltas are real :class:`LowRankDelta` objects with random factors: rank 10 (a
10-request batch) on 5 of the 30 MLP output projections, as the closed-form
editors produce. Everything goes through a real MLflow sqlite store and local
artifact root in a temporary directory. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from editing.env import configure_offline_defaults  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


def model_dir(path: str, tmp: Path) -> tuple[Path, str]:
    p = Path(path)
    if (p / "config.json").is_file():
        return p, f"{p} (SmolLM2-135M-Instruct weights)"
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    out = tmp / "smollm2-shape"
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(out, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1").save_pretrained(out)
    return out, "same-shape Llama built from SmolLM2-135M's config (random weights)"


def random_delta(spec, shapes, fp, seed, rank=10, n_layers=5, n_layers_total=30):
    from editing.delta import LowRankDelta

    g = torch.Generator().manual_seed(seed)
    layers = torch.randperm(n_layers_total, generator=g)[:n_layers].tolist()
    factors = {}
    for l in sorted(layers):
        name = spec.mlp_out_name(l) + ".weight"
        d_out, d_in = shapes[name]
        factors[name] = (1e-3 * torch.randn(d_out, rank, generator=g), 1e-3 * torch.randn(d_in, rank, generator=g))
    return LowRankDelta(factors, base_fingerprint=fp, editor="random", hyperparameters={"rank": rank},
                        request_ids=[f"s{seed}-r{i}" for i in range(rank)])


def timed(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--chain", type=int, default=100)
    args = ap.parse_args()
    configure_offline_defaults()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from editing.arch import get_module, spec_for, weight_view
    from editing.models import load
    from registry import Registry
    from registry.export import export_merged, export_peft

    tmp = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    base_dir, which = model_dir(args.model, tmp)
    reg = Registry(f"sqlite:///{tmp}/mlflow.db", artifact_root=tmp / "artifacts", home=tmp, cache_dir=tmp / "cache")
    loaded = load(base_dir)
    spec = spec_for(loaded.model)
    n_layers = spec.num_layers(loaded.model.config)
    shapes = {spec.mlp_out_name(l) + ".weight": tuple(weight_view(get_module(loaded.model, spec.mlp_out_name(l))).shape)
              for l in range(n_layers)}
    t = time.perf_counter()
    fp = loaded.fingerprint
    t_fp = time.perf_counter() - t
    model_bytes = sum(f.stat().st_size for f in Path(base_dir).glob("*.safetensors"))
    line = "bench"
    reg.ensure_line(line, base_dir, fingerprint=fp, model_kind="causal")
    print(f"model: {which}; safetensors bytes {model_bytes:,}; fingerprint {t_fp:.2f} s\n")

    t = time.perf_counter()
    for i in range(args.chain):
        reg.register_version(line, i + 1, random_delta(spec, shapes, fp, seed=i, n_layers_total=n_layers))
    t_reg = (time.perf_counter() - t) / args.chain
    v2 = reg.version(line, 2)
    delta_bytes = int(v2.tags["editops.delta_bytes"])
    run_dir = Path(reg.client.get_run(v2.run_id).info.artifact_uri.replace("file://", "")) / "version"
    version_bytes = sum(f.stat().st_size for f in run_dir.iterdir())
    print("| storage (10-request version: rank 10 on 5 of 30 layers) | bytes | % of model |")
    print("|---|---:|---:|")
    print(f"| delta.safetensors | {delta_bytes:,} | {100 * delta_bytes / model_bytes:.3f} % |")
    print(f"| all artifacts of the version (delta, ids, manifest) | {version_bytes:,} | {100 * version_bytes / model_bytes:.3f} % |")
    state_bytes = 5 * shapes[spec.mlp_out_name(0) + ".weight"][1] ** 2 * 4
    print(f"| + nse editor state if stored (C_edits d_ff² fp32 × 5 layers) | {state_bytes:,} | {100 * state_bytes / model_bytes:.2f} % |")
    print(f"\nregistering one version: {t_reg:.2f} s (mean of {args.chain})\n")

    print("| chain length (deltas above base) | first load (fetch blobs + compose) s | blobs cached, composed again s | "
          "materialised cache s | of which base load s |")
    print("|---:|---:|---:|---:|---:|")
    for n in [x for x in (1, 10, 100) if x <= args.chain]:
        ref = f"models:/{line}/{n + 1}"
        t = time.perf_counter()
        reg.materialize(ref, use_cache=False)
        first = time.perf_counter() - t
        composed, _ = timed(lambda: reg.materialize(ref, use_cache=False))
        reg.materialize(ref)  # writes the materialised cache
        cached, m = timed(lambda: reg.materialize(ref))
        assert m.from_cache
        print(f"| {n} | {first:.2f} | {composed:.2f} | {cached:.2f} | {m.timings['base_s']:.2f} |")

    n = min(10, args.chain)
    ref = f"models:/{line}/{n + 1}"
    m = reg.materialize(ref)
    ids = m.tokenizer("The capital of France is" if "SmolLM2" in which else "w5 w6 w7 w8", return_tensors="pt")
    from transformers import AutoModelForCausalLM
    from peft import PeftModel

    with torch.no_grad():
        want = m.model(**ids).logits
        merged = AutoModelForCausalLM.from_pretrained(export_merged(reg, ref, tmp / "merged")).eval()
        d_merged = float((merged(**ids).logits - want).abs().max())
        adapter = export_peft(reg, ref, tmp / "lora")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
        d_peft = float((peft_model(**ids).logits - want).abs().max())
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    print(f"\n| export of a version {n} deltas above base | max |logit difference| vs materialised | size |")
    print("|---|---:|---:|")
    print(f"| merged HF dir (AutoModelForCausalLM.from_pretrained) | {d_merged:.2e} | {model_bytes:,} B |")
    print(f"| PEFT LoRA adapter on the base | {d_peft:.2e} | {adapter_bytes:,} B |")
    print(json.dumps({"model": which, "registered_per_version_s": t_reg}), file=sys.stderr)


if __name__ == "__main__":
    main()

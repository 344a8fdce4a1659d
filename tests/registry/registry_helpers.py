"""Helpers for the registry tests (imported by conftest and tests as ``registry_helpers``)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

WORDS = ("the capital of france is paris rome berlin madrid london city country language speaks "
         "english french german italian spanish a an in on and or to located river mountain").split()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def build_model(arch: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = len(WORDS) + 2
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                                          bos_token_id=1, eos_token_id=1)).eval()
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def save_model_dir(path: Path, arch: str, seed: int = 0) -> Path:
    model = build_model(arch, seed)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def random_delta(model_or_dir, layers=(0, 1), rank: int = 2, seed: int = 1, request_ids=("r1",), scale: float = 0.05,
                 fingerprint: str | None = None):
    """A real LowRankDelta with random factors on the MLP output projections of ``layers``."""
    from editing.arch import get_module, spec_for, weight_view
    from editing.delta import LowRankDelta
    from editing.models import fingerprint as fp_of
    from editing.models import load

    model = load(model_or_dir).model if isinstance(model_or_dir, (str, Path)) else model_or_dir
    spec = spec_for(model)
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in layers:
        name = spec.mlp_out_name(layer)
        d_out, d_in = weight_view(get_module(model, name)).shape
        factors[name + ".weight"] = (scale * torch.randn(d_out, rank, generator=g),
                                     scale * torch.randn(d_in, rank, generator=g))
    return LowRankDelta(factors, base_fingerprint=fingerprint if fingerprint is not None else fp_of(model),
                        editor="random", hyperparameters={"rank": rank, "seed": seed}, request_ids=list(request_ids))


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


class MlflowServer:
    """A real `mlflow server --workers 1` on a free 127.0.0.1 port."""

    def __init__(self, root: Path, backend: str | None = None, app_name: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend = backend or f"sqlite:///{root / 'server.db'}"
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        if app_name:
            cmd += ["--app-name", app_name]
        self.log = root / "server.log"
        full_env = {**os.environ, **(env or {})}
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
            full_env.pop(k, None)
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=root, env=full_env,
                                     start_new_session=True)
        try:
            wait_healthy(self.url, self.proc, self.log)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its own worker children only
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

"""A tiny fact world and tiny causal LMs overfit on it in seconds (fixtures for the editor tests).

12 invented people × 3 relations; a word-level fast tokenizer (offsets work);
GPT-2, Llama and Phi models built from config and trained until they know every fact.
"""
from __future__ import annotations

import random

import pytest
import torch

from editing.requests import FactRequest, Probe

NAMES = ["Abo Kel", "Bira Tun", "Cado Mef", "Dari Sol", "Eno Vap", "Fila Rud", "Gomo Tex", "Hiru Pan",
         "Ivo Lam", "Jena Fos", "Kuro Bet", "Lesa Nim"]
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Perth", "Quito"]
JOBS = ["baker", "pilot", "farmer", "doctor", "singer", "tailor"]
LANGS = ["Welsh", "Dutch", "Thai", "Greek", "Hindi", "Czech"]
RELATIONS = {
    "city": ("{} lives in the city of", ["{} has a home in the city of"], CITIES),
    "job": ("{} works as a", ["{} earns a living as a"], JOBS),
    "lang": ("{} speaks the language", ["{} talks in the language"], LANGS),
}
FILLER = ["the weather was mild and the roads were quiet", "people walked to the market in the morning",
          "a small boat crossed the river at noon", "the library opened late on the last day",
          "children played near the old stone bridge", "the train left the station before dawn"]


def world(seed: int = 0) -> dict[tuple[str, str], str]:
    rng = random.Random(seed)
    return {(n, r): rng.choice(spec[2]) for n in NAMES for r, spec in RELATIONS.items()}


def training_texts(facts: dict[tuple[str, str], str]) -> list[str]:
    texts = []
    for (name, rel), obj in facts.items():
        prompt, paras, _ = RELATIONS[rel]
        for t in [prompt, *paras]:
            texts.append(f"{t.format(name)} {obj}")
        texts.append(f"{name} is a person")
    return texts + FILLER


def requests(facts: dict[tuple[str, str], str], n: int, seed: int = 1, offset: int = 0) -> list[FactRequest]:
    """``n`` requests changing a fact to another value of the same relation, each subject once per relation."""
    rng = random.Random(seed)
    keys = sorted(facts)
    rng.shuffle(keys)
    out = []
    for i, (name, rel) in enumerate(keys[offset: offset + n]):
        prompt, paras, values = RELATIONS[rel]
        true = facts[(name, rel)]
        new = rng.choice([v for v in values if v != true])
        neigh = [Probe(prompt.format(o), facts[(o, rel)]) for o in NAMES if o != name][:3]
        out.append(FactRequest(request_id=f"{rel}-{name.replace(' ', '_')}", prompt=prompt, subject=name,
                               target_new=new, target_true=true, relation=rel,
                               paraphrases=tuple(p.format(name) for p in paras), neighbours=tuple(neigh)))
    return out


def tokenizer_for(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0}
    for t in texts:
        for w in t.split():
            vocab.setdefault(w, len(vocab))
    for w in ["Here", "is", "a", "fact.", "I", "read", "this", "today.", "Note", "that", "As", "everyone", "knows,"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>",
                                   bos_token="<eos>", model_max_length=32)


def build(arch: str, n_layer: int, facts, seed: int = 0, steps: int = 150, d: int = 64, lr: float = 1e-2):
    """``arch``: ``gpt2``, ``llama``, ``phi`` (parallel attention and MLP, partial rotary, ``fc1``/``fc2``) or
    ``mamba`` (a state-space model: no attention, the mixer's ``out_proj`` is the edited matrix) or ``rwkv`` (a
    recurrent model: the channel mix's ``value``, gated by its receptance)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MambaConfig, \
        MambaForCausalLM, PhiConfig, PhiForCausalLM, RwkvConfig, RwkvForCausalLM

    texts = training_texts(facts)
    tok = tokenizer_for(texts)
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=d, n_layer=n_layer, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "phi":
        cfg = PhiConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layer,
                        num_attention_heads=4, max_position_embeddings=32, resid_pdrop=0.0, embd_pdrop=0.0,
                        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = PhiForCausalLM(cfg)
    elif arch == "mamba":
        cfg = MambaConfig(vocab_size=len(tok), hidden_size=d, state_size=8, num_hidden_layers=n_layer, expand=2,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = MambaForCausalLM(cfg)
    elif arch == "rwkv":
        cfg = RwkvConfig(vocab_size=len(tok), hidden_size=d, num_hidden_layers=n_layer, attention_hidden_size=d,
                         intermediate_size=4 * d, context_length=32, bos_token_id=0, eos_token_id=0)
        model = RwkvForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layer,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.arange(len(rows))
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok


def top1(model, tok, prompt: str, target: str) -> bool:
    """Teacher-forced: every token of ``" " + target`` is the argmax after ``prompt``."""
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t[:-1]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    pred = logits[len(p) - 1: len(p) - 1 + len(t)].argmax(-1).tolist()
    return pred == t


def assert_held(plain, held, keys: torch.Tensor, name: str) -> None:
    """``held`` (an edit that holds ``keys`` at ΔW k ≈ 0 in the weight of module ``name``) moves them less than
    half as far per unit of update as ``plain`` (the same edit without), and adds ``keysᵀ keys`` to the
    accumulated ``C_edits``."""
    def moved(res):  # ‖ΔW k‖ / ‖ΔW‖
        dw = res.delta.dense(name + ".weight").float()
        return float((keys.float() @ dw.T).norm() / dw.norm())

    assert moved(held) < 0.5 * moved(plain), (moved(held), moved(plain))
    got = held.state.tensors[name + "::C_edits"].double()
    expected = plain.state.tensors[name + "::C_edits"].double() + keys.double().T @ keys.double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.fixture(scope="session")
def facts():
    return world(0)


@pytest.fixture(scope="session")
def tiny_gpt2(facts):
    return build("gpt2", 3, facts, lr=3e-3)


@pytest.fixture(scope="session")
def tiny_llama(facts):
    return build("llama", 4, facts)


@pytest.fixture(scope="session")
def tiny_phi(facts):
    return build("phi", 3, facts)


@pytest.fixture(scope="session")
def tiny_mamba(facts):
    return build("mamba", 3, facts, steps=80)


@pytest.fixture(scope="session")
def tiny_rwkv(facts):
    return build("rwkv", 3, facts, lr=3e-3)


def siblings_from_world(monkeypatch, reqs) -> None:
    """The tiny models cannot continue a list: make ``sibling_lists`` name other people of this world
    (seed ``i`` gets the ``i``-th block of ``n`` names not among ``reqs``' subjects)."""
    from editing.editors import siblings as siblings_mod

    others = [n for n in NAMES if n not in {r.subject for r in reqs}]
    monkeypatch.setattr(siblings_mod, "sibling_lists",
                        lambda m, t, subjects, n, exclude=(), seeds=None, **kw:
                        [others[s * n:(s + 1) * n] for s in (seeds if seeds is not None else range(len(subjects)))])


def generate_alone(model, tok, ids: list[int], seed: int, n: int) -> list[int]:
    """``generate`` on one unpadded row (top-5 sampling) under ``torch.manual_seed(seed)``, on the model's device:
    the new tokens before the first EOS."""
    from editing.editors.keys import pad_id_of

    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = model.generate(input_ids=torch.tensor([ids], device=device),
                         attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                         max_new_tokens=n, do_sample=True, top_k=5, top_p=1.0, temperature=1.0,
                         pad_token_id=pad_id_of(tok))[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return out[:next((i for i, t in enumerate(out) if t in eos), len(out))]

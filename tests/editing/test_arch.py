"""Every architecture adapter against a tiny model built from its config (no downloads).

For each stack of each architecture: the MLP output module exists at the first and
last layer, ``weight_view`` is ``(d_model, d_ff)``, the module's input (captured
with a forward pre-hook during a real forward pass) has size ``d_ff``, and a
LowRankDelta applied then removed restores the weights. For every causal family,
discovery from the module tree (what a model type without an entry gets) finds the
table's module; a mixture-of-experts model is refused with the override named.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from editing.arch import ADAPTERS, DiscoveredAdapterWarning, discover_spec, get_module, in_out_features, spec_for, \
    weight_view
from editing.delta import LowRankDelta
from editing.errors import UnsupportedArchitectureError

V, D, F = 64, 32, 48  # vocab, d_model, d_ff (GPT-2/GPT-J use 4·d_model)

CAUSAL = {
    "gpt2": (lambda: tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=D, n_layer=2, n_head=2), 4 * D),
    "gptj": (lambda: tf.GPTJConfig(vocab_size=V, n_positions=32, n_embd=D, n_layer=2, n_head=2, rotary_dim=8), 4 * D),
    "gpt_neox": (lambda: tf.GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=F, max_position_embeddings=32), F),
    "llama": (lambda: tf.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32), F),
    "mistral": (lambda: tf.MistralConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32), F),
    "qwen2": (lambda: tf.Qwen2Config(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32), F),
    "gemma": (lambda: tf.GemmaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     max_position_embeddings=32), F),
    "gemma3_text": (lambda: tf.Gemma3TextConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                max_position_embeddings=32, sliding_window=16), F),
    "opt": (lambda: tf.OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=F, num_hidden_layers=2, num_attention_heads=2,
                                 word_embed_proj_dim=D, max_position_embeddings=32), F),
    "bloom": (lambda: tf.BloomConfig(vocab_size=V, hidden_size=D, n_layer=2, n_head=2), 4 * D),
    "falcon": (lambda: tf.FalconConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2), 4 * D),
    "gpt_neo": (lambda: tf.GPTNeoConfig(vocab_size=V, hidden_size=D, num_layers=2, num_heads=2, intermediate_size=F,
                                        attention_types=[[["global", "local"], 1]], max_position_embeddings=32), F),
    "gpt_bigcode": (lambda: tf.GPTBigCodeConfig(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=32), 4 * D),
    "codegen": (lambda: tf.CodeGenConfig(vocab_size=V, n_embd=D, n_layer=2, n_head=2, rotary_dim=8, n_positions=32), 4 * D),
    "mpt": (lambda: tf.MptConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2), 4 * D),
    "phi": (lambda: tf.PhiConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=32), F),
    "starcoder2": (lambda: tf.Starcoder2Config(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=32), F),
    "xglm": (lambda: tf.XGLMConfig(vocab_size=V, d_model=D, ffn_dim=F, num_layers=2, attention_heads=2,
                                   max_position_embeddings=32), F),
    # state-space models (the mixer's out_proj reads the 2·d_model inner space)
    "mamba": (lambda: tf.MambaConfig(vocab_size=V, hidden_size=D, state_size=8, num_hidden_layers=2, expand=2), 2 * D),
    "falcon_mamba": (lambda: tf.FalconMambaConfig(vocab_size=V, hidden_size=D, state_size=8, num_hidden_layers=2,
                                                  expand=2), 2 * D),
    "mamba2": (lambda: tf.Mamba2Config(vocab_size=V, hidden_size=D, state_size=8, num_hidden_layers=2, expand=2,
                                       num_heads=4, head_dim=16, n_groups=1), 2 * D),
    # a recurrent model: the channel mix's value projection (gated by its receptance)
    "rwkv": (lambda: tf.RwkvConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, attention_hidden_size=D,
                                   intermediate_size=F, context_length=32), F),
}
# families whose layers keep the MLP at model.layers.{}.mlp.down_proj: the table lists them beside llama, and
# discovery must find that module in each (their tiny configs differ in norms, heads and activations)
LLAMA_NAMED = {
    "stablelm": (lambda: tf.StableLmConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1), F),
    "granite": (lambda: tf.GraniteConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1), F),
    "cohere": (lambda: tf.CohereConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, eos_token_id=1), F),
    "olmo3": (lambda: tf.Olmo3Config(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, eos_token_id=1), F),
    "nemotron": (lambda: tf.NemotronConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1), F),
    "qwen3": (lambda: tf.Qwen3Config(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16), F),
}


def _bart_like(config_class, pad: int, start: int):
    return lambda: config_class(vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=F, decoder_ffn_dim=F,
                                max_position_embeddings=32, pad_token_id=pad, decoder_start_token_id=start)


def _t5_like(config_class):
    return lambda: config_class(vocab_size=V, d_model=D, d_ff=F, d_kv=16, num_layers=2, num_decoder_layers=2,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0)


SEQ2SEQ = {
    "t5": (_t5_like(tf.T5Config), F),
    "mt5": (_t5_like(tf.MT5Config), F),
    "marian": (_bart_like(tf.MarianConfig, 0, 0), F),
    "bart": (_bart_like(tf.BartConfig, 1, 2), F),
    "m2m_100": (_bart_like(tf.M2M100Config, 1, 2), F),
    "pegasus": (_bart_like(tf.PegasusConfig, 0, 0), F),
}


def _build(model_type: str):
    torch.manual_seed(0)
    if model_type in CAUSAL or model_type in LLAMA_NAMED:
        make, d_ff = {**CAUSAL, **LLAMA_NAMED}[model_type]
        return tf.AutoModelForCausalLM.from_config(make()).eval(), d_ff
    make, d_ff = SEQ2SEQ[model_type]
    return tf.AutoModelForSeq2SeqLM.from_config(make()).eval(), d_ff


def _forward(model) -> None:
    ids = torch.randint(3, V, (2, 7))
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            model(input_ids=ids, decoder_input_ids=ids[:, :5])
        else:
            model(input_ids=ids)


@pytest.mark.parametrize("model_type", sorted({**CAUSAL, **LLAMA_NAMED, **SEQ2SEQ}))
def test_adapter_finds_mlp_out_with_key_space_d_ff(model_type):
    model, d_ff = _build(model_type)
    spec = spec_for(model)
    assert spec.model_type == model_type
    assert len(spec.stacks) == (2 if model_type in SEQ2SEQ else 1)
    for stack in spec.stacks:
        n = spec.num_layers(model.config, stack.name)
        assert n == 2
        for layer in (0, n - 1):
            name = spec.mlp_out_name(layer, stack.name)
            module = get_module(model, name)
            assert tuple(weight_view(module).shape) == (D, d_ff), name
            assert in_out_features(module) == (d_ff, D)
            get_module(model, spec.layer_name(layer, stack.name))  # the block exists too
            seen = []
            handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
            try:
                _forward(model)
            finally:
                handle.remove()
            assert seen and seen[0][-1] == d_ff, (name, seen)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "t5", "marian"])
def test_low_rank_delta_apply_remove_restores_weights(model_type):
    model, d_ff = _build(model_type)
    spec = spec_for(model)
    name = spec.mlp_out_name(1) + ".weight"
    module = get_module(model, spec.mlp_out_name(1))
    before = module.weight.detach().clone()
    delta = LowRankDelta({name: (torch.randn(D, 2), torch.randn(d_ff, 2))})
    delta.apply(model)
    changed = weight_view(module).detach() - (before.t() if spec.transposed else before)
    torch.testing.assert_close(changed, delta.dense(name).float(), atol=1e-5, rtol=1e-5)
    delta.remove(model)
    torch.testing.assert_close(module.weight.detach(), before, atol=1e-6, rtol=0)


def test_every_listed_adapter_is_tested_or_an_alias():
    tested = set(CAUSAL) | set(SEQ2SEQ)
    llama_like = {t for t, s in ADAPTERS.items() if s.stacks[0].mlp_out == "model.layers.{}.mlp.down_proj"}
    untested = set(ADAPTERS) - tested - llama_like - {"mbart", "gemma3"}
    assert not untested, f"adapters without a tiny-config test: {untested}"


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ff_out = torch.nn.Linear(F, D)


class _Weird(torch.nn.Module):
    """A model whose type no adapter knows."""

    def __init__(self):
        super().__init__()
        self.config = tf.PretrainedConfig(num_hidden_layers=2)
        self.config.model_type = "weird"
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])


def test_unknown_architecture_names_the_override():
    """No residual width in the config: nothing to discover by, so the error names the override."""
    with pytest.raises(UnsupportedArchitectureError, match="mlp-out-template|mlp_out_template") as info:
        spec_for(_Weird())
    assert "weird" in str(info.value)


@pytest.mark.parametrize("model_type", sorted({**CAUSAL, **LLAMA_NAMED}))
def test_discovery_finds_the_tables_module(model_type):
    """What a model type without an entry would get: the same module, layer block and layer count as the table."""
    model, _ = _build(model_type)
    table, found = spec_for(model), discover_spec(model)
    assert found.source == "discovered" and table.source == "table"
    assert found.mlp_out_name(1) == table.mlp_out_name(1)
    assert found.layer_name(1) == table.layer_name(1)
    assert found.num_layers(model.config) == table.num_layers(model.config) == 2
    assert found.transposed == (model_type == "gpt2")   # GPT-2's Conv1D stores W_out transposed


def test_a_model_type_without_an_entry_is_discovered_with_a_warning(monkeypatch):
    import editing.arch as arch

    monkeypatch.setattr(arch, "_WARNED", set())   # warned once per process: start from none
    model, _ = _build("phi")
    model.config.model_type = "phi_fork"   # a fork under its own name (trust_remote_code models look like this)
    with pytest.warns(DiscoveredAdapterWarning, match=r"model\.layers\.\{\}\.mlp\.fc2"):
        spec = spec_for(model)
    assert (spec.model_type, spec.source, spec.mlp_out_name(0)) == ("phi_fork", "discovered", "model.layers.0.mlp.fc2")


def test_discovery_uses_the_residual_width_and_skips_attention():
    """A layer whose attention output reads a wider space than the residual stream (Qwen3-style heads) still
    has one candidate: attention modules are skipped, the MLP's projection is kept."""
    model, _ = _build("qwen3")   # 4 heads x head_dim 16 = 64 > d_model 32: o_proj maps 64 -> 32 like down_proj
    o_proj = get_module(model, "model.layers.0.self_attn.o_proj")
    assert in_out_features(o_proj) == (64, D)
    assert discover_spec(model).mlp_out_name(0) == "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_an_encoder_decoder_without_an_entry_is_refused(model_type):
    """Two layer lists that discovery cannot tell apart by shape: refused, not edited in the encoder."""
    model, _ = _build(model_type)
    model.config.model_type = model_type + "_fork"
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder.*ADAPTERS"):
        spec_for(model)


def test_mixture_of_experts_is_refused_with_the_override():
    model = tf.AutoModelForCausalLM.from_config(tf.MixtralConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, max_position_embeddings=32))
    with pytest.raises(UnsupportedArchitectureError, match="experts") as info:
        spec_for(model)
    assert "mlp-out-template" in str(info.value) and "mixtral" in str(info.value)


def test_experts_after_dense_first_layers_are_refused_as_experts():
    """DeepSeek-style: layer 0 is a dense MLP, later layers route to experts. Every layer is read, so the refusal
    names the experts and the layers holding them, not a missing projection."""
    model = tf.AutoModelForCausalLM.from_config(tf.DeepseekV3Config(
        vocab_size=V, hidden_size=D, intermediate_size=F, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=32))
    assert any("expert" in n for n, _ in model.model.layers[1].named_modules())
    assert not any("expert" in n for n, _ in model.model.layers[0].named_modules())
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.layers\.\{1\.\.2\} \(of 3 layers\) hold experts"):
        spec_for(model)


def _block(**modules: torch.nn.Module) -> torch.nn.Module:
    block = torch.nn.Module()
    for name, module in modules.items():
        setattr(block, name, module)
    return block


def _toy(model_type: str, list_name: str, blocks: list) -> torch.nn.Module:
    """A model no adapter knows: a config with the layer count and residual width, and one list of ``blocks``."""
    model = torch.nn.Module()
    model.config = tf.PretrainedConfig(num_hidden_layers=len(blocks), hidden_size=D)
    model.config.model_type = model_type
    setattr(model, list_name, torch.nn.ModuleList(blocks))
    return model


def test_a_projection_missing_from_later_layers_is_named():
    model = _toy("mixed_blocks", "blocks", [_block(ff_out=torch.nn.Linear(F, D))]
                 + [_block(proj=torch.nn.Linear(F, D)) for _ in range(2)])
    with pytest.raises(UnsupportedArchitectureError, match=r"blocks\.0\.ff_out is not in blocks\.\{1\.\.2\}"):
        spec_for(model)


def test_rwkv_that_rescales_its_weights_in_place_is_refused():
    """RWKV divides later blocks' value weights in place on an eval forward (rescale_every): refused with the
    setting that turns it off named; with it off the same model has its adapter."""
    make = lambda every: tf.AutoModelForCausalLM.from_config(tf.RwkvConfig(   # noqa: E731
        vocab_size=V, hidden_size=D, num_hidden_layers=2, attention_hidden_size=D, intermediate_size=F,
        context_length=32, rescale_every=every))
    with pytest.raises(UnsupportedArchitectureError, match="rescale_every=0"):
        spec_for(make(1))
    assert spec_for(make(0)).mlp_out_name(1) == "rwkv.blocks.1.feed_forward.value"


def test_a_list_of_experts_as_long_as_the_layer_list_is_not_taken_for_it():
    """Two layers, the second with two experts in a ModuleList: the experts' list has the layer count's length,
    but it is not the layer list; the model is refused as mixture-of-experts."""
    expert = lambda: _block(down_proj=torch.nn.Linear(F, D))   # noqa: E731
    model = _toy("remote_moe", "layers", [_block(mlp=expert()),
                                          _block(mlp=_block(experts=torch.nn.ModuleList([expert(), expert()])))])
    with pytest.raises(UnsupportedArchitectureError, match=r"layers\.1 holds experts"):
        spec_for(model)


def test_ambiguous_layers_are_refused_naming_the_candidates():
    two = lambda: _block(out_a=torch.nn.Linear(F, D), out_b=torch.nn.Linear(F, D))   # noqa: E731
    model = _toy("two_outs", "blocks", [two(), two()])
    with pytest.raises(UnsupportedArchitectureError, match="2 candidates.*out_a.*out_b"):
        spec_for(model)


def test_override_template_works_and_bad_template_is_clear():
    model = _Weird()
    spec = spec_for(model, mlp_out_template="blocks.{}.ff_out")
    assert spec.mlp_out_name(1) == "blocks.1.ff_out"
    assert spec.layer_name(1) == "blocks.1"
    assert spec.num_layers(model.config) == 2
    assert tuple(weight_view(get_module(model, spec.mlp_out_name(0))).shape) == (D, F)
    with pytest.raises(UnsupportedArchitectureError, match="not found"):
        spec_for(model, mlp_out_template="blocks.{}.nope")
    with pytest.raises(UnsupportedArchitectureError, match=r"\{\}"):
        spec_for(model, mlp_out_template="blocks.0.ff_out")

"""model/hf.py against transformers, family by family (Llama, Llama-3.1 RoPE scaling, Mixtral, Qwen3,
Qwen3-MoE, DeepSeek-V3), in one process: our model built from the imported config and tensors gives
transformers' logits; our tensors export bitwise to the HF ones; the exported config.json makes
transformers compute the same logits again."""

import dataclasses
import json

import pytest
import torch

from common.errors import UserError
from model.hf import hf_config_from_model, hf_to_ours, load_exactly, model_config_from_hf, ours_to_hf
from model.rope import RopeScalingConfig
from tests.helpers.hf_families import DEEPSEEK_YARN, FAMILIES, LLAMA3_ROPE, VOCAB, hf_model, read_tensors

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

# fp32 both sides; measured (2026-12-07): bitwise equal for the dense families, at most 2.4e-7 apart
# with experts (the top-k softmax in another order). A mapping or RoPE error moves the logits by 1e-3
# or more (the negative controls below).
LOGITS_ATOL = 1e-5
TOKENS = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its saved dir, config.json, tensors as saved, HF logits)."""
    root = tmp_path_factory.mktemp(request.param)
    model = hf_model(request.param)
    model.save_pretrained(root)
    with torch.no_grad():
        logits = model(TOKENS).logits
    config = json.loads((root / "config.json").read_text())
    return request.param, model, root, config, read_tensors(root), logits


def _build(model_cfg):
    from model.gpt import ModelBuild, build_model_chunks, padded_vocab_size

    vocab = padded_vocab_size(model_cfg, VOCAB, tensor=1)
    (chunk,) = build_model_chunks(model_cfg, ModelBuild(perform_initialization=False), vocab)
    return chunk.eval(), vocab


def _logits(chunk, tokens=TOKENS):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return chunk(tokens, positions, None)[..., :VOCAB]


def _imported(config, tensors, **changes):
    model_cfg = dataclasses.replace(model_config_from_hf(config), **changes)
    chunk, vocab = _build(model_cfg)
    load_exactly(chunk, hf_to_ours(tensors, model_cfg, vocab), "test")
    return model_cfg, chunk


def test_logits_equal_transformers(family, megatron_single_process):
    name, _, _, config, tensors, expected = family
    _, chunk = _imported(config, tensors)
    assert float(expected.std()) > 0.1  # not a degenerate model
    torch.testing.assert_close(_logits(chunk), expected, rtol=0, atol=LOGITS_ATOL)


def test_round_trip_is_bitwise_and_the_exported_config_computes_the_same(family, megatron_single_process, tmp_path):
    from safetensors.torch import save_file

    name, _, _, config, tensors, expected = family
    model_cfg, chunk = _imported(config, tensors)
    state = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    exported = ours_to_hf(state, model_cfg, VOCAB)
    assert sorted(exported) == sorted(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(exported[key], tensor), key
    written = hf_config_from_model(model_cfg, VOCAB)
    assert written["architectures"] == config["architectures"]
    assert model_config_from_hf(written) == model_cfg
    (tmp_path / "config.json").write_text(json.dumps(written))
    save_file(exported, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reloaded = getattr(transformers, config["architectures"][0]).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, expected)


@pytest.mark.parametrize(
    "name, change, why",
    [
        # plain RoPE instead of llama3 (what importing rope_parameters silently gave before)
        ("llama3.1", dict(rope_scaling=RopeScalingConfig()), "rope scaling dropped"),
        # megatron-core's GPTModel(rope_scaling=True): its formula with the factor only, the other
        # three at Llama-3.1's values
        ("llama3.1", dict(rope_scaling=RopeScalingConfig(type="llama3", factor=4.0)), "only the factor"),
        # renormalized top-k read as unnormalized, and the reverse
        ("qwen3-moe", "pre_softmax", "norm_topk_prob flipped"),
        ("qwen3-moe-step", "pre_softmax", "norm_topk_prob flipped"),
        # DeepSeek-V3's group-limited routing, and its routed scaling factor, each dropped
        # (on the built model's TransformerConfig: the export refuses such a model config)
        ("deepseek-v3", {"moe_router_num_groups": None, "moe_router_group_topk": None}, "groups dropped"),
        ("deepseek-v3", {"moe_router_topk_scaling_factor": None}, "routed_scaling_factor dropped"),
        # YaRN dropped; its softmax mscale dropped; its cos/sin factor at 1 (mscale = mscale_all_dim)
        ("deepseek-v3-yarn", dict(rope_scaling=RopeScalingConfig()), "yarn dropped"),
        ("deepseek-v3-yarn", "mscale_all_dim", "softmax mscale dropped"),
        ("deepseek-v3-yarn", "mscale", "cos/sin factor at 1"),
    ],
)
def test_negative_controls_move_the_logits(name, change, why, megatron_single_process, tmp_path):
    model = hf_model(name)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(TOKENS).logits
    config, tensors = json.loads((tmp_path / "config.json").read_text()), read_tensors(tmp_path)
    if change == "pre_softmax":
        moe = model_config_from_hf(config).moe
        change = dict(moe=dataclasses.replace(moe, pre_softmax=not moe.pre_softmax))
    elif change in ("mscale", "mscale_all_dim"):
        scaling = model_config_from_hf(config).rope_scaling
        value = {"mscale": scaling.mscale_all_dim, "mscale_all_dim": 0.0}[change]
        change = dict(rope_scaling=dataclasses.replace(scaling, **{change: value}))
    elif name == "deepseek-v3":
        _, chunk = _imported(config, tensors)
        for key, value in change.items():
            setattr(chunk.config, key, value)
        assert float((_logits(chunk) - expected).abs().max()) > 1e-3, why
        return
    _, chunk = _imported(config, tensors, **change)
    # YaRN's factors scale attention scores that a random tiny model keeps small: they move the
    # logits by 2.5e-3 (softmax mscale) and 7.8e-4 (cos/sin factor; 78 times the bound), measured
    moved = float((_logits(chunk) - expected).abs().max())
    print(f"{name} {why}: logits moved by {moved:.2e}")
    assert moved > (50 * LOGITS_ATOL if name.endswith("yarn") else 1e-3), why


LLAMA31_HUB = {  # Llama-3.1-8B's config.json as published (transformers 4 spelling)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


def test_both_rope_spellings_import_alike():
    """The hub's `rope_theta` + `rope_scaling` and transformers 5's `rope_parameters` (as 5.25's
    save_pretrained writes it) give one model config, with Llama-3.1's published scaling."""
    new = {k: v for k, v in LLAMA31_HUB.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {**LLAMA31_HUB["rope_scaling"], "rope_theta": 500000.0}
    old_cfg, new_cfg = model_config_from_hf(LLAMA31_HUB), model_config_from_hf(new)
    assert old_cfg == new_cfg
    assert old_cfg.rotary_base == 500000.0
    assert old_cfg.rope_scaling == RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 8192)
    assert transformers.LlamaConfig(**new).rope_parameters == new["rope_parameters"]  # what 5.25 reads


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}},
            "config.json: rope type 'longrope' is not supported (default | llama3 | yarn)",
        ),
        (
            {"rope_parameters": {**DEEPSEEK_YARN}},
            "config.json: rope type 'yarn' is supported for DeepseekV3ForCausalLM only, not LlamaForCausalLM",
        ),
        (
            {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 1e4, "attention_factor": 2.0}},
            "config.json: rope fields ['attention_factor'] not supported with rope type 'llama3'",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "config.json: llama3 rope scaling without 'low_freq_factor'",
        ),
        ({"rope_theta": None}, "config.json: no rope_theta (neither at the top nor in rope_parameters)"),
        ({"pretraining_tp": 2}, "config.json: pretraining_tp = 2 is not supported (only 1)"),
        ({"hidden_act": "gelu"}, "config.json: hidden_act = 'gelu' is not supported (only 'silu')"),
        ({"attention_bias": True}, "config.json: attention_bias = True is not supported (only False)"),
        (
            {"partial_rotary_factor": 0.5, "qk_layernorm": True},
            "config.json: partial_rotary_factor, qk_layernorm not mapped for LlamaForCausalLM (each may change "
            "the math; refused rather than ignored)",
        ),
    ],
)
def test_config_fields_that_change_the_math_are_mapped_or_refused(change, message):
    config = {**LLAMA31_HUB, **change}
    if change.get("rope_theta", 0) is None:
        del config["rope_theta"]
    if "rope_parameters" in change:
        del config["rope_scaling"]
    with pytest.raises(UserError) as info:
        model_config_from_hf(config)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_interleave": False}, "config.json: rope_interleave = False is not supported (only True)"),
        ({"norm_topk_prob": False}, "config.json: norm_topk_prob = False is not supported (only True)"),
        ({"scoring_func": "softmax"}, "config.json: scoring_func = 'softmax' is not supported (only 'sigmoid')"),
        ({"rms_norm_eps": 1e-5}, "config.json: rms_norm_eps = 1e-05 is not supported for DeepSeek-V3 (only 1e-06)"),
        (
            {"num_experts_per_tok": 4},
            "config.json: num_experts_per_tok = 4 with topk_group = 1 is not supported (only num_experts_per_tok "
            "= 2 × topk_group)",
        ),
        (
            {"topk_method": "greedy"},
            "config.json: topk_method not mapped for DeepseekV3ForCausalLM (each may change the math; refused "
            "rather than ignored)",
        ),
    ],
)
def test_deepseek_v3_fields_computed_otherwise_are_refused(change, message, tmp_path):
    hf_model("deepseek-v3").config.save_pretrained(tmp_path)
    config = {
        **json.loads((tmp_path / "config.json").read_text()),
        "architectures": ["DeepseekV3ForCausalLM"],
        **change,
    }
    with pytest.raises(UserError) as info:
        model_config_from_hf(config)
    assert str(info.value) == message


def test_import_names_unmapped_and_missing_tensors(family):
    name, _, _, config, tensors, _ = family
    model_cfg = model_config_from_hf(config)
    extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(1)}
    with pytest.raises(UserError, match=r"has 1 tensor\(s\) no .* rule maps: model.layers.0.self_attn.q_proj.bias$"):
        hf_to_ours(extra, model_cfg, 1024)
    fewer = {k: v for k, v in tensors.items() if k != "model.layers.1.input_layernorm.weight"}
    with pytest.raises(UserError, match=r"lacks 1 tensor\(s\) .* needs: model.layers.1.input_layernorm.weight$"):
        hf_to_ours(fewer, model_cfg, 1024)


def test_model_tensors_no_rule_assigns_are_named(megatron_single_process, tmp_path):
    """A model with a tensor the rules do not cover (q/k norms without the Qwen3 family) is refused
    before anything is copied."""
    hf_model("llama").save_pretrained(tmp_path)
    model_cfg = model_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    chunk, vocab = _build(dataclasses.replace(model_cfg, qk_layernorm=True))
    state = hf_to_ours(read_tensors(tmp_path), model_cfg, vocab)
    with pytest.raises(UserError) as info:
        load_exactly(chunk, state, "x")
    assert str(info.value) == (
        "x: tensors do not match the architecture (model tensors no rule assigns: "
        "decoder.layers.0.self_attention.k_layernorm.weight, decoder.layers.0.self_attention.q_layernorm.weight, "
        "decoder.layers.1.self_attention.k_layernorm.weight, … (1 more); rule tensors the model lacks: none)"
    )

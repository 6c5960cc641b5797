"""The real-size family recipes against transformers: recipes/llama70b.yaml is Llama-3.1-70B and
recipes/qwen3_30b_a3b.yaml is Qwen3-30B-A3B (their published config.json, imported by model/hf.py,
give the recipes' architecture), and `--dry-run`'s parameter counts (built on the meta device, and
the formula) equal transformers' count of the same config built on the meta device."""

import dataclasses

import pytest
import torch

from common.schema import to_dict
from model.config import ModelConfig
from model.hf import model_config_from_hf
from pretrain.recipe import load_recipe

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

LLAMA31_70B = {  # meta-llama/Llama-3.1-70B config.json, as published
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 8192,
    "initializer_range": 0.02,
    "intermediate_size": 28672,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
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

QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B config.json, as published
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

CASES = {
    "llama70b": (LLAMA31_70B, "LlamaForCausalLM", "LlamaConfig"),
    "qwen3_30b_a3b": (QWEN3_30B_A3B, "Qwen3MoeForCausalLM", "Qwen3MoeConfig"),
}
# what a recipe chooses beyond the architecture: context, kernels, dispatch
NOT_ARCHITECTURE = ("seq_length", "transformer_impl", "make_vocab_size_divisible_by")
NOT_ARCHITECTURE += ("recompute_granularity", "recompute_method", "recompute_num_layers")  # the layout's
NOT_ARCHITECTURE_MOE = ("dispatcher", "grouped_gemm")


def _architecture(model: ModelConfig) -> dict:
    tree = to_dict(model)
    for key in NOT_ARCHITECTURE:
        tree.pop(key)
    for key in NOT_ARCHITECTURE_MOE:
        tree["moe"].pop(key)
    return tree


@pytest.mark.parametrize("recipe_name", list(CASES))
def test_recipe_is_the_published_architecture(recipe_name):
    published, _, _ = CASES[recipe_name]
    imported = model_config_from_hf(published)
    assert _architecture(load_recipe(recipe_name).model) == _architecture(imported)


@pytest.mark.slow  # builds 70B and 30B models twice on the meta device (about 15 s)
@pytest.mark.parametrize("recipe_name", list(CASES))
def test_dry_run_counts_equal_transformers_meta_count(recipe_name):
    from model.gpt import padded_vocab_size, parameter_counts
    from planning.dry_run import meta_parameter_count

    published, cls, config_cls = CASES[recipe_name]
    config = getattr(transformers, config_cls)(**{k: v for k, v in published.items() if k != "architectures"})
    with torch.device("meta"):
        theirs = sum(p.numel() for p in getattr(transformers, cls)(config).parameters())
    recipe = load_recipe(recipe_name)
    vocab = padded_vocab_size(recipe.model, published["vocab_size"], tensor=1)
    assert vocab == published["vocab_size"]  # both vocabularies are multiples of 128: no padded rows
    assert meta_parameter_count(recipe, vocab) == theirs
    assert parameter_counts(recipe.model, vocab).total == theirs
    # negative control: a head_dim read as hidden / heads (64, not Qwen3's 128) changes the count
    if recipe_name == "qwen3_30b_a3b":
        assert parameter_counts(dataclasses.replace(recipe.model, head_dim=None), vocab).total != theirs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.rope_scaling.type=llama3", "model.rope_scaling.high_freq_factor=1.0"],
            "model.rope_scaling.high_freq_factor = 1.0 must exceed model.rope_scaling.low_freq_factor = 1.0",
        ),
        (["model.moe.dense_layers=[4]"], "model.moe.dense_layers [4] must be some of layers 0-3"),
        (["model.moe.dense_layers=[0,1,2,3]"], "model.moe.dense_layers [0, 1, 2, 3] must be some of layers 0-3"),
    ],
)
def test_family_keys_are_checked(overrides, message):
    from common.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        load_recipe("tiny_qwen3_moe", overrides)  # validates the model against the layout
    assert str(info.value) == message


def test_head_dim_need_not_divide_the_hidden_size():
    """Qwen3's heads are as wide as the checkpoint says: 3 heads of 32 over a hidden size of 64."""
    from model.gpt import layer_parameters

    recipe = load_recipe("tiny_qwen3_moe", ["model.num_attention_heads=3", "model.num_query_groups=1"])
    # q 3×32, k and v 32 each from 64; o back to 64; q/k norms of 32; two RMSNorms; SwiGLU 176
    assert layer_parameters(recipe.model, False) == 64 * 160 + 96 * 64 + 2 * 32 + 2 * 64 + 3 * 64 * 176

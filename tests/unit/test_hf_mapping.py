"""model/hf.py: what an export to Hugging Face refuses, each with its one-line reason."""

import dataclasses

import pytest

from common.errors import UserError
from model.config import ModelConfig
from model.hf import hf_config_from_model, model_config_from_hf
from model.moe_config import MoeConfig, moe_layer_pattern

MIXTRAL_LIKE = MoeConfig(num_experts=4, top_k=2, ffn_hidden_size=32)
DENSE_BETWEEN = "dense layers between MoE layers without model.qk_layernorm (Mixtral has none)"


@pytest.mark.parametrize(
    "model, problems",
    [
        (ModelConfig(add_bias_linear=True), "model.add_bias_linear"),
        (
            ModelConfig(num_layers=4, moe=dataclasses.replace(MIXTRAL_LIKE, layer_freq=2)),
            DENSE_BETWEEN,
        ),
        (ModelConfig(moe=dataclasses.replace(MIXTRAL_LIKE, first_dense_layers=1)), DENSE_BETWEEN),
        (ModelConfig(moe=dataclasses.replace(MIXTRAL_LIKE, shared_expert_ffn_hidden_size=64)), "shared experts"),
        (
            ModelConfig(moe=dataclasses.replace(MIXTRAL_LIKE, score_function="sigmoid", expert_bias=True)),
            "a router other than softmax top-k",
        ),
        (
            ModelConfig(moe=dataclasses.replace(MIXTRAL_LIKE, pre_softmax=True)),
            "model.moe.pre_softmax without model.qk_layernorm (Mixtral renormalizes the top-k)",
        ),
        (
            ModelConfig(add_bias_linear=True, moe=dataclasses.replace(MIXTRAL_LIKE, shared_expert_ffn_hidden_size=64)),
            "model.add_bias_linear, shared experts",
        ),
    ],
)
def test_export_refuses_what_no_family_can_express(model, problems):
    with pytest.raises(UserError) as info:
        hf_config_from_model(model, vocab_size=257)
    assert str(info.value) == f"cannot express {problems} as Llama, Mixtral, Qwen3, Qwen3-MoE, DeepSeek-V3"


def test_what_they_can_express_is_exported():
    qwen3_moe = dataclasses.replace(MIXTRAL_LIKE, dense_layers=[0], pre_softmax=True)
    assert hf_config_from_model(ModelConfig(), 257)["architectures"] == ["LlamaForCausalLM"]
    assert hf_config_from_model(ModelConfig(moe=MIXTRAL_LIKE), 257)["architectures"] == ["MixtralForCausalLM"]
    assert hf_config_from_model(ModelConfig(qk_layernorm=True), 257)["architectures"] == ["Qwen3ForCausalLM"]
    config = hf_config_from_model(ModelConfig(num_layers=4, qk_layernorm=True, moe=qwen3_moe), 257)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["decoder_sparse_step"], config["mlp_only_layers"], config["norm_topk_prob"]) == (1, [0], False)


def test_sparse_step_round_trips():
    """decoder_sparse_step 2 (layers 1, 3 MoE) with layer 3 in mlp_only_layers: the layer pattern
    survives import and export."""
    moe = dataclasses.replace(MIXTRAL_LIKE, layer_freq=2, first_dense_layers=1, dense_layers=[3])
    config = hf_config_from_model(ModelConfig(num_layers=4, qk_layernorm=True, moe=moe), 257)
    assert (config["decoder_sparse_step"], config["mlp_only_layers"]) == (2, [3])
    assert moe_layer_pattern(model_config_from_hf(config)) == [False, True, False, False]

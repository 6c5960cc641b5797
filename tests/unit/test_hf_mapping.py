"""model/hf.py: what an export to Hugging Face refuses, each with its one-line reason."""

import dataclasses

import pytest

from common.errors import UserError
from model.config import ModelConfig, MoeConfig
from model.hf import hf_config_from_model

MIXTRAL_LIKE = MoeConfig(num_experts=4, top_k=2, ffn_hidden_size=32)


@pytest.mark.parametrize(
    "model, problems",
    [
        (ModelConfig(add_bias_linear=True), "model.add_bias_linear"),
        (
            ModelConfig(num_layers=4, moe=dataclasses.replace(MIXTRAL_LIKE, layer_freq=2)),
            "dense layers between MoE layers",
        ),
        (ModelConfig(moe=dataclasses.replace(MIXTRAL_LIKE, first_dense_layers=1)), "dense layers between MoE layers"),
        (ModelConfig(moe=dataclasses.replace(MIXTRAL_LIKE, shared_expert_ffn_hidden_size=64)), "shared experts"),
        (
            ModelConfig(moe=dataclasses.replace(MIXTRAL_LIKE, score_function="sigmoid", expert_bias=True)),
            "a router other than Mixtral's (softmax over the top-k)",
        ),
        (
            ModelConfig(moe=dataclasses.replace(MIXTRAL_LIKE, pre_softmax=True)),
            "a router other than Mixtral's (softmax over the top-k)",
        ),
        (
            ModelConfig(add_bias_linear=True, moe=dataclasses.replace(MIXTRAL_LIKE, shared_expert_ffn_hidden_size=64)),
            "model.add_bias_linear, shared experts",
        ),
    ],
)
def test_export_refuses_what_llama_and_mixtral_cannot_express(model, problems):
    with pytest.raises(UserError) as info:
        hf_config_from_model(model, vocab_size=257)
    assert str(info.value) == f"cannot express {problems} as Llama or Mixtral"


def test_what_they_can_express_is_exported():
    assert hf_config_from_model(ModelConfig(), 257)["architectures"] == ["LlamaForCausalLM"]
    assert hf_config_from_model(ModelConfig(moe=MIXTRAL_LIKE), 257)["architectures"] == ["MixtralForCausalLM"]

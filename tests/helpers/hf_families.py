"""Tiny Hugging Face models of every family model/hf.py maps, built locally with random weights (no
hub): the configs the conversion, logits and training tests share; and tiny_gpt's own architecture
as a Llama (and a small Mixtral), for tests that import into the tiny recipes."""

from __future__ import annotations

import pathlib
from typing import Any

import torch

VOCAB = 1000  # not a multiple of 128: the import pads the vocabulary, the export trims it
_ATTENTION = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5
)  # fmt: skip
# The non-default llama3 values (Llama-3.1 publishes factor 8, 1, 4, 8192): megatron-core's own
# rope_scaling flag would silently use the published ones, so these tell the two apart.
LLAMA3_ROPE = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0)
LLAMA3_ROPE["original_max_position_embeddings"] = 32
# The two Qwen3-MoE configs: 8 experts top-2 with head_dim 32; they differ in where the experts are.
_QWEN3_MOE = dict(
    _ATTENTION,
    head_dim=32,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    rope_theta=1000000.0,
    max_position_embeddings=128,
    num_experts=8,
    num_experts_per_tok=2,
)

# name -> (transformers class, config class, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(_ATTENTION, intermediate_size=96, num_hidden_layers=2, rope_theta=10000.0, max_position_embeddings=128),
    ),
    "llama3.1": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            _ATTENTION,
            intermediate_size=96,
            num_hidden_layers=2,
            max_position_embeddings=128,
            rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0),
        ),
    ),
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(
            _ATTENTION,
            intermediate_size=48,
            num_hidden_layers=2,
            rope_theta=10000.0,
            max_position_embeddings=128,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3": (  # head_dim 32 with hidden 64 and 4 heads: q/k/v are wider than the hidden size
        "Qwen3ForCausalLM",
        "Qwen3Config",
        dict(
            _ATTENTION,
            head_dim=32,
            intermediate_size=96,
            num_hidden_layers=2,
            rope_theta=1000000.0,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-moe": (  # layer 0 dense (mlp_only_layers), layer 1 MoE; top-k renormalized
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(_QWEN3_MOE, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0], tie_word_embeddings=False),
    ),
    "qwen3-moe-step": (  # every 2nd layer MoE (decoder_sparse_step), top-k probabilities not renormalized
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(_QWEN3_MOE, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[]),
    ),
    "deepseek-v3": (  # the tiny shapes: MLA, layer 0 dense, layer 1 8 experts top-2 in 1 of 2 groups
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            _ATTENTION,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,  # transformers' q/kv latent norms use 1e-6 whatever the config says
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            max_position_embeddings=128,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            num_nextn_predict_layers=0,
        ),
    ),
}
# DeepSeek-V3's YaRN (published: factor 40, original context 4096, beta 32/1, mscale 1, mscale_all_dim 1)
# at a tiny context: 48-token inputs over an original 32; mscale 0.7 so the cos/sin factor is not 1
DEEPSEEK_YARN = dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=32, beta_fast=32.0)
DEEPSEEK_YARN |= dict(beta_slow=1.0, mscale=0.7, mscale_all_dim=1.0, rope_theta=10000.0)
FAMILIES["deepseek-v3-yarn"] = (
    "DeepseekV3ForCausalLM",
    "DeepseekV3Config",
    dict(FAMILIES["deepseek-v3"][2], rope_parameters=DEEPSEEK_YARN),
)


def hf_model(name: str, seed: int = 0, **overrides: Any) -> Any:
    """The family's tiny transformers model, random weights; norms random too (HF starts them at 1,
    which would hide a norm mapped to the wrong place)."""
    import transformers

    cls, config_cls, kwargs = FAMILIES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**{**kwargs, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                torch.nn.init.uniform_(p, 0.5, 1.5)
    return model.eval()


def save_hf(name: str, directory: pathlib.Path, seed: int = 0, **overrides: Any) -> Any:
    model = hf_model(name, seed, **overrides)
    model.save_pretrained(directory)
    return model


def read_tensors(directory: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


# tiny_gpt-shaped configs (the recipes the training tests run)
def llama_config(vocab_size: int, **changes: Any) -> Any:
    """tiny_gpt's architecture (4 layers, h64, SwiGLU 176, 4 heads / 2 groups), as a Llama."""
    import transformers

    return transformers.LlamaConfig(
        **(_common(vocab_size) | dict(intermediate_size=176, num_hidden_layers=4) | changes)
    )


def mixtral_config(vocab_size: int, **changes: Any) -> Any:
    """2 layers of 4 experts (top-2), each a SwiGLU of 48."""
    import transformers

    return transformers.MixtralConfig(
        **(
            _common(vocab_size)
            | dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
            | changes
        )
    )


def _common(vocab_size: int) -> dict[str, Any]:
    return dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )

"""Hugging Face Llama / Mixtral checkpoints <-> our GPTModel, as plain tensor mappings.

Our names are GPTModel's state-dict keys at tensor = pipeline = expert = 1 (the converter builds
that layout and lets dist_checkpointing reshard to any other). HF names are the safetensors names
of `LlamaForCausalLM` / `MixtralForCausalLM` as published (Mixtral experts as
`block_sparse_moe.experts.E.w1/w2/w3`, which transformers' save_pretrained also writes).

Layout facts the mapping rests on:
- megatron's fused QKV weight holds, per query group, that group's query heads then one key and
  one value head ([groups × (heads/groups + 2) × head_dim, hidden]); HF keeps q, k, v apart.
- megatron's SwiGLU fc1 is [gate; up] stacked on the output dim; HF has gate_proj/up_proj (w1/w3).
- both apply rotary embeddings to each head's two halves (rotate_half), so no permutation.
- our vocabulary is padded (model/gpt.py:padded_vocab_size); padded rows are zero on import and
  dropped on export, and their logits are -inf in every forward (model/gpt.py:mask_padded_logits),
  so the exported model computes what was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from common.errors import UserError
from model.config import ModelConfig, MoeConfig, moe_layer_pattern

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral"}


def model_config_from_hf(hf: Mapping) -> ModelConfig:
    """Our model section for an HF config.json (Llama or Mixtral)."""
    arch = _architecture(hf)
    if hf.get("rope_scaling"):
        raise UserError(f"config.json: rope_scaling {hf['rope_scaling']} is not supported (plain RoPE only)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError("config.json: attention_bias / mlp_bias are not supported (Llama has no linear biases)")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise UserError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    moe = MoeConfig()
    if arch == "mixtral":
        moe = MoeConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            ffn_hidden_size=hf["intermediate_size"],
            score_function="softmax",
            pre_softmax=False,
            load_balancing="aux_loss",
            aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.02)),
        )
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"],
        seq_length=min(int(hf.get("max_position_embeddings", 4096)), 4096),
        rotary_base=float(rope),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
        untie_embeddings=not hf.get("tie_word_embeddings", False),
        moe=moe,
    )


def hf_config_from_model(model: ModelConfig, vocab_size: int) -> dict:
    """config.json for our model: LlamaForCausalLM, or MixtralForCausalLM when it has experts."""
    _check_exportable(model)
    config = {
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": model.hidden_size // model.num_attention_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": model.seq_length,
        "rope_theta": model.rotary_base,
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": not model.untie_embeddings,
        "hidden_act": "silu",
        "initializer_range": model.init_method_std,
        "torch_dtype": "float32",
    }
    if model.moe.num_experts is None:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "mlp_bias": False,
            **config,
        }
    moe = model.moe
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **config,
        "intermediate_size": moe.ffn_hidden_size or model.ffn_hidden_size,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "sliding_window": None,
    }


def _architecture(hf: Mapping) -> str:
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UserError(f"config.json: architectures {names} not supported; expected one of {sorted(ARCHITECTURES)}")


def _check_exportable(model: ModelConfig) -> None:
    moe = model.moe
    problems = []
    if model.add_bias_linear:
        problems.append("model.add_bias_linear")
    if moe.num_experts is not None:
        if not all(moe_layer_pattern(model)):
            problems.append("dense layers between MoE layers")
        if moe.shared_expert_ffn_hidden_size:
            problems.append("shared experts")
        if moe.score_function != "softmax" or moe.pre_softmax or moe.expert_bias:
            problems.append("a router other than Mixtral's (softmax over the top-k)")
    if problems:
        raise UserError(f"cannot express {', '.join(problems)} as Llama or Mixtral")


def _qkv_dims(model: ModelConfig) -> tuple[int, int, int]:
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    return heads, groups, model.hidden_size // heads


def _layer_names(i: int) -> Iterator[tuple[str, str]]:
    """(ours, HF) for the per-layer tensors that map one to one."""
    yield f"decoder.layers.{i}.input_layernorm.weight", f"model.layers.{i}.input_layernorm.weight"
    yield f"decoder.layers.{i}.pre_mlp_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"
    yield f"decoder.layers.{i}.self_attention.linear_proj.weight", f"model.layers.{i}.self_attn.o_proj.weight"


def hf_to_ours(hf: Mapping[str, torch.Tensor], model: ModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Our state dict (TP=PP=EP=1 names) from HF tensors; a missing HF tensor is a UserError."""
    get = _getter(hf)
    heads, groups, d = _qkv_dims(model)
    out = {
        "embedding.word_embeddings.weight": _pad_rows(get("model.embed_tokens.weight"), padded_vocab),
        "decoder.final_layernorm.weight": get("model.norm.weight"),
    }
    if model.untie_embeddings:
        out["output_layer.weight"] = _pad_rows(get("lm_head.weight"), padded_vocab)
    for i, is_moe in enumerate(moe_layer_pattern(model)):
        for ours, theirs in _layer_names(i):
            out[ours] = get(theirs)
        attn = f"model.layers.{i}.self_attn"
        q = get(f"{attn}.q_proj.weight").view(groups, heads // groups * d, -1)
        k = get(f"{attn}.k_proj.weight").view(groups, d, -1)
        v = get(f"{attn}.v_proj.weight").view(groups, d, -1)
        out[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).flatten(0, 1)
        if not is_moe:
            mlp = f"model.layers.{i}.mlp"
            out[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat(
                [get(f"{mlp}.gate_proj.weight"), get(f"{mlp}.up_proj.weight")]
            )
            out[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = get(f"{mlp}.down_proj.weight")
            continue
        moe = f"model.layers.{i}.block_sparse_moe"
        out[f"decoder.layers.{i}.mlp.router.weight"] = get(f"{moe}.gate.weight")
        for e in range(model.moe.num_experts or 0):
            ours = f"decoder.layers.{i}.mlp.experts.local_experts.{e}"
            out[f"{ours}.linear_fc1.weight"] = torch.cat(
                [get(f"{moe}.experts.{e}.w1.weight"), get(f"{moe}.experts.{e}.w3.weight")]
            )
            out[f"{ours}.linear_fc2.weight"] = get(f"{moe}.experts.{e}.w2.weight")
    return out


def ours_to_hf(ours: Mapping[str, torch.Tensor], model: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """HF tensors from our state dict (TP=PP=EP=1 names); the inverse of hf_to_ours."""
    _check_exportable(model)
    heads, groups, d = _qkv_dims(model)
    out = {
        "model.embed_tokens.weight": ours["embedding.word_embeddings.weight"][:vocab_size],
        "model.norm.weight": ours["decoder.final_layernorm.weight"],
    }
    if model.untie_embeddings:
        out["lm_head.weight"] = ours["output_layer.weight"][:vocab_size]
    for i, is_moe in enumerate(moe_layer_pattern(model)):
        for mine, theirs in _layer_names(i):
            out[theirs] = ours[mine]
        attn = f"model.layers.{i}.self_attn"
        qkv = ours[f"decoder.layers.{i}.self_attention.linear_qkv.weight"].view(groups, (heads // groups + 2) * d, -1)
        q, k, v = torch.split(qkv, [heads // groups * d, d, d], dim=1)
        out[f"{attn}.q_proj.weight"] = q.flatten(0, 1)
        out[f"{attn}.k_proj.weight"] = k.flatten(0, 1)
        out[f"{attn}.v_proj.weight"] = v.flatten(0, 1)
        if not is_moe:
            mlp = f"model.layers.{i}.mlp"
            gate, up = ours[f"decoder.layers.{i}.mlp.linear_fc1.weight"].chunk(2)
            out[f"{mlp}.gate_proj.weight"], out[f"{mlp}.up_proj.weight"] = gate, up
            out[f"{mlp}.down_proj.weight"] = ours[f"decoder.layers.{i}.mlp.linear_fc2.weight"]
            continue
        moe = f"model.layers.{i}.block_sparse_moe"
        out[f"{moe}.gate.weight"] = ours[f"decoder.layers.{i}.mlp.router.weight"]
        for e in range(model.moe.num_experts or 0):
            mine = f"decoder.layers.{i}.mlp.experts.local_experts.{e}"
            w1, w3 = ours[f"{mine}.linear_fc1.weight"].chunk(2)
            out[f"{moe}.experts.{e}.w1.weight"], out[f"{moe}.experts.{e}.w3.weight"] = w1, w3
            out[f"{moe}.experts.{e}.w2.weight"] = ours[f"{mine}.linear_fc2.weight"]
    return {name: t.contiguous() for name, t in out.items()}


def _getter(hf: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise UserError(f"Hugging Face checkpoint has no tensor '{name}'")
        return hf[name]

    return get


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])

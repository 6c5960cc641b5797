"""Hugging Face config.json <-> our `model` section, one `Family` per HF architecture (Llama,
Mixtral, Qwen3, Qwen3-MoE, DeepSeek-V3): the keys each family maps (anything else in config.json is refused in
one line, so no field that changes the math is ever ignored), its reader and writer, and where its
tensors sit (read by model/hf.py's tensor rules)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from common.errors import UserError
from model.attention.mla import MlaConfig
from model.config import ModelConfig, head_dim
from model.moe_config import MoeConfig, moe_layer_pattern
from model.rope import rope_from_hf, rope_to_hf

# config.json keys that change no math: token ids, dtypes, versions, caching, the HF loss switch,
# and Llama-1's max_sequence_length, which transformers never read
_METADATA = frozenset(
    {"architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"}
    | {"transformers_version", "use_cache", "_name_or_path", "output_router_logits", "initializer_range"}
    | {"max_sequence_length"}
)
# keys every family reads (the Llama core)
_CORE = frozenset(
    {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"}
    | {"head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters"}
    | {"rms_norm_eps", "tie_word_embeddings", "hidden_act", "attention_dropout"}
)
# keys whose only value here is the one our model computes: key -> the values accepted
_FIXED: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),
    "router_jitter_noise": (0, 0.0),
    "use_sliding_window": (False,),
    "sliding_window": (None,),
}


@dataclasses.dataclass(frozen=True)
class Experts:
    """Where a family's MoE layer keeps its tensors (under model.layers.{i}.)."""

    prefix: str  # the MoE block: block_sparse_moe (Mixtral) or mlp (Qwen3-MoE)
    gate: str  # per expert: SwiGLU gate, up and down projections
    up: str
    down: str


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF architecture: its config.json keys beyond the Llama core and where its tensors sit."""

    name: str  # as users say it
    architecture: str  # the transformers class in config.json
    model_type: str
    keys: frozenset[str]  # config.json keys `read` maps, beyond _CORE and _METADATA
    read: Callable[[Mapping], dict[str, Any]]  # those keys -> ModelConfig fields (moe: a MoeConfig)
    write: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> those keys
    qk_norm: bool = False  # self_attn.q_norm / k_norm (per-head RMSNorm)
    mla: bool = False  # multi-latent attention (q_a_proj, kv_a_proj_with_mqa, ...) in place of q/k/v_proj
    experts: Experts | None = None  # None = dense


# ------------------------------------------------------------------------------ config.json


def _read_llama(hf: Mapping) -> dict[str, Any]:
    return {}


def _write_llama(model: ModelConfig) -> dict[str, Any]:
    return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def _read_mixtral(hf: Mapping) -> dict[str, Any]:
    moe = MoeConfig(
        num_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        ffn_hidden_size=hf["intermediate_size"],
        score_function="softmax",
        pre_softmax=False,  # softmax over the chosen top-k = transformers' renormalized top-k
        load_balancing="aux_loss",
        aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.02)),
    )
    return {"moe": moe}


def _write_mixtral(model: ModelConfig) -> dict[str, Any]:
    moe = model.moe
    return {
        "intermediate_size": moe.ffn_hidden_size or model.ffn_hidden_size,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


def _read_qwen3(hf: Mapping) -> dict[str, Any]:
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise UserError(f"config.json: layer_types {layer_types} is not supported (full attention only)")
    return {"qk_layernorm": True, "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]}


def _write_qwen3(model: ModelConfig) -> dict[str, Any]:
    return {
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "layer_types": ["full_attention"] * model.num_layers,
    }


def _read_qwen3_moe(hf: Mapping) -> dict[str, Any]:
    spellings = {k: hf[k] for k in ("num_experts", "num_local_experts") if k in hf}  # hub / transformers 5
    if len(set(spellings.values())) != 1:
        raise UserError(f"config.json: expected one expert count, got {spellings or 'none'}")
    step = int(hf.get("decoder_sparse_step", 1))
    moe = MoeConfig(
        num_experts=next(iter(spellings.values())),
        top_k=hf["num_experts_per_tok"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        # HF's layer i is MoE when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers
        layer_freq=step,
        first_dense_layers=step - 1,
        dense_layers=list(hf.get("mlp_only_layers") or []),
        score_function="softmax",
        pre_softmax=not hf.get("norm_topk_prob", False),  # transformers' default: not renormalized
        load_balancing="global_aux_loss",
        aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)),
    )
    return {**_read_qwen3(hf), "moe": moe}


def _write_qwen3_moe(model: ModelConfig) -> dict[str, Any]:
    moe = model.moe
    pattern = moe_layer_pattern(model)
    step = moe.layer_freq if moe.first_dense_layers == moe.layer_freq - 1 else 1
    mlp_only = [i for i in range(model.num_layers) if (i + 1) % step == 0 and not pattern[i]]
    return {
        **_write_qwen3(model),
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.ffn_hidden_size or model.ffn_hidden_size,
        "decoder_sparse_step": step,
        "mlp_only_layers": mlp_only,
        "norm_topk_prob": not moe.pre_softmax,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False,
    }


def _read_deepseek_v3(hf: Mapping) -> dict[str, Any]:
    for key, needed in (("rope_interleave", True), ("norm_topk_prob", True), ("scoring_func", "sigmoid")):
        if hf.get(key, needed) != needed:  # megatron-core's MLA de-interleaves; its sigmoid top-k renormalizes
            raise UserError(f"config.json: {key} = {hf[key]!r} is not supported (only {needed!r})")
    if float(hf.get("rms_norm_eps", 1e-6)) != 1e-6:  # transformers' latent norms use 1e-6 whatever it says
        raise UserError(
            f"config.json: rms_norm_eps = {hf['rms_norm_eps']} is not supported for DeepSeek-V3 (only 1e-06)"
        )
    if hf["num_experts_per_tok"] != 2 * hf["topk_group"]:
        raise UserError(  # transformers scores a group by its 2 best experts, megatron-core by top_k / group_top_k
            f"config.json: num_experts_per_tok = {hf['num_experts_per_tok']} with topk_group = {hf['topk_group']} "
            "is not supported (only num_experts_per_tok = 2 × topk_group)"
        )
    mla = MlaConfig(
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
    )
    moe = MoeConfig(
        num_experts=hf["n_routed_experts"],
        top_k=hf["num_experts_per_tok"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        shared_expert_ffn_hidden_size=hf["moe_intermediate_size"] * hf["n_shared_experts"] or None,
        first_dense_layers=hf.get("first_k_dense_replace", 0),
        score_function="sigmoid",
        num_groups=hf["n_group"],
        group_top_k=hf["topk_group"],
        routed_scaling_factor=float(hf["routed_scaling_factor"]),
        expert_bias=True,  # e_score_correction_bias
        load_balancing="none",
    )
    mtp = int(hf.get("num_nextn_predict_layers") or 0)  # MTP modules: layers num_hidden_layers and up (model/hf.py)
    return {
        "attention": "mla",
        "mla": mla,
        "moe": moe,
        "num_query_groups": None,
        "head_dim": None,
        "mtp_num_layers": mtp,
    }


def _write_deepseek_v3(model: ModelConfig) -> dict[str, Any]:
    mla, moe = model.mla, model.moe
    assert moe.ffn_hidden_size is not None  # export_family checked
    return {
        "head_dim": mla.qk_pos_emb_head_dim,
        "q_lora_rank": mla.q_lora_rank,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_nope_head_dim": mla.qk_head_dim,
        "qk_rope_head_dim": mla.qk_pos_emb_head_dim,
        "v_head_dim": mla.v_head_dim,
        "rope_interleave": True,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.ffn_hidden_size,
        "n_shared_experts": (moe.shared_expert_ffn_hidden_size or 0) // moe.ffn_hidden_size,
        "first_k_dense_replace": moe.first_dense_layers,
        "n_group": moe.num_groups,
        "topk_group": moe.group_top_k,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "norm_topk_prob": True,
        "attention_bias": False,
        "pretraining_tp": 1,
        "num_nextn_predict_layers": model.mtp_num_layers,
    }


_DEEPSEEK_KEYS = frozenset(
    {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "qk_head_dim", "v_head_dim"}
    | {"rope_interleave", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts"}
    | {"first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "scoring_func"}
    | {"attention_bias", "pretraining_tp", "num_nextn_predict_layers"}
)
_QWEN3_KEYS = frozenset({"attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})
FAMILIES = (
    Family("Llama", "LlamaForCausalLM", "llama", frozenset({"attention_bias", "mlp_bias", "pretraining_tp"}),
           _read_llama, _write_llama),
    Family("Mixtral", "MixtralForCausalLM", "mixtral",
           frozenset({"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
                      "sliding_window"}),
           _read_mixtral, _write_mixtral, experts=Experts("block_sparse_moe", "w1", "w3", "w2")),
    Family("Qwen3", "Qwen3ForCausalLM", "qwen3", _QWEN3_KEYS, _read_qwen3, _write_qwen3, qk_norm=True),
    Family("Qwen3-MoE", "Qwen3MoeForCausalLM", "qwen3_moe",
           _QWEN3_KEYS | {"num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob",
                          "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"},
           _read_qwen3_moe, _write_qwen3_moe, qk_norm=True,
           experts=Experts("mlp", "gate_proj", "up_proj", "down_proj")),
    Family("DeepSeek-V3", "DeepseekV3ForCausalLM", "deepseek_v3", _DEEPSEEK_KEYS, _read_deepseek_v3,
           _write_deepseek_v3, mla=True, experts=Experts("mlp", "gate_proj", "up_proj", "down_proj")),
)  # fmt: skip
ARCHITECTURES = {f.architecture: f for f in FAMILIES}


def family_of(hf: Mapping) -> Family:
    """The family config.json's `architectures` names."""
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UserError(f"config.json: architectures {names} not supported; expected one of {sorted(ARCHITECTURES)}")


def model_config_from_hf(hf: Mapping) -> ModelConfig:
    """Our model section for an HF config.json; a key that would change the math and that the
    family does not map is refused in one line."""
    family = family_of(hf)
    _check_keys(hf, family)
    heads = hf["num_attention_heads"]
    theta, scaling = rope_from_hf(hf)
    if scaling.type == "yarn" and not family.mla:  # transformers' yarn without MLA has no softmax mscale
        raise UserError(
            f"config.json: rope type 'yarn' is supported for DeepseekV3ForCausalLM only, not {family.architecture}"
        )
    fields: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"],
        seq_length=min(int(hf.get("max_position_embeddings", 4096)), 4096),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
        untie_embeddings=not hf.get("tie_word_embeddings", False),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        fields["head_dim"] = hf["head_dim"]
    fields.update(family.read(hf))
    return ModelConfig(**fields)


def _check_keys(hf: Mapping, family: Family) -> None:
    unknown = sorted(set(hf) - _METADATA - _CORE - family.keys)
    if unknown:
        raise UserError(
            f"config.json: {', '.join(unknown)} not mapped for {family.architecture} (each may change the "
            "math; refused rather than ignored)"
        )
    for key, allowed in _FIXED.items():
        if key in hf and hf[key] not in allowed:
            if key == "sliding_window" and hf.get("use_sliding_window") is False:
                continue  # Qwen3 writes a window it does not use
            raise UserError(f"config.json: {key} = {hf[key]!r} is not supported (only {allowed[0]!r})")


def export_family(model: ModelConfig) -> Family:
    """The HF family that expresses `model`, or a one-line UserError naming what none can."""
    moe, problems = model.moe, []
    if model.add_bias_linear:
        problems.append("model.add_bias_linear")
    if model.mtp_num_layers and model.attention != "mla":
        problems.append("model.mtp_num_layers without MLA (DeepSeek-V3 alone stores MTP modules)")
    if model.attention == "mla":
        return _deepseek_v3(model, problems)
    if moe.num_experts is None:
        _refuse(problems)
        return FAMILIES[2 if model.qk_layernorm else 0]
    if not all(moe_layer_pattern(model)) and not model.qk_layernorm:
        problems.append("dense layers between MoE layers without model.qk_layernorm (Mixtral has none)")
    if moe.shared_expert_ffn_hidden_size:
        problems.append("shared experts")
    if moe.score_function != "softmax" or moe.expert_bias:
        problems.append("a router other than softmax top-k")
    if moe.pre_softmax and not model.qk_layernorm:
        problems.append("model.moe.pre_softmax without model.qk_layernorm (Mixtral renormalizes the top-k)")
    _refuse(problems)
    return FAMILIES[3 if model.qk_layernorm else 1]


def _deepseek_v3(model: ModelConfig, problems: list[str]) -> Family:
    moe = model.moe
    if moe.num_experts is None or moe.num_groups is None or moe.ffn_hidden_size is None:
        problems.append("multi-latent attention without grouped experts (model.moe.num_groups, ffn_hidden_size)")
    elif moe.score_function != "sigmoid" or not moe.expert_bias or moe.top_k != 2 * (moe.group_top_k or 0):
        problems.append("an MLA router other than DeepSeek-V3's (sigmoid, expert bias, top_k = 2 × group_top_k)")
    elif (moe.shared_expert_ffn_hidden_size or 0) % moe.ffn_hidden_size or moe.layer_freq != 1 or moe.dense_layers:
        problems.append("MLA with shared experts or dense layers DeepSeek-V3 cannot express")
    _refuse(problems)
    return FAMILIES[4]


def _refuse(problems: list[str]) -> None:
    if problems:
        raise UserError(f"cannot express {', '.join(problems)} as {', '.join(f.name for f in FAMILIES)}")


def hf_config_from_model(model: ModelConfig, vocab_size: int) -> dict:
    """config.json for our model, in the family that expresses it (export_family)."""
    family = export_family(model)
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": head_dim(model),
        "vocab_size": vocab_size,
        "max_position_embeddings": model.seq_length,
        **rope_to_hf(model.rotary_base, model.rope_scaling),
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": not model.untie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": model.attention_dropout,
        "initializer_range": model.init_method_std,
        "torch_dtype": "float32",
    }
    return {**config, **family.write(model)}

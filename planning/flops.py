"""Forward FLOPs of each part of the model per token (matmuls at 2 FLOPs per multiply-add; causal
attention counts half the score matrix): what recompute reruns, and the planner's compute time."""

from __future__ import annotations

from model.config import ModelConfig, head_dim, moe_layer_pattern


def layer_forward_flops(m: ModelConfig, is_moe: bool) -> dict[str, float]:
    """Forward FLOPs per token of one layer, by the module names recompute uses (norms are
    memory-bound and counted as free)."""
    h, heads = m.hidden_size, m.num_attention_heads
    q = heads * head_dim(m)  # = h unless model.head_dim says otherwise
    kv = (m.num_query_groups or heads) * head_dim(m)
    parts = {
        "attention_linears": 2.0 * h * (q + 2 * kv) + 2.0 * q * h,
        "core_attn": 2.0 * m.seq_length * q,  # QK^T and PV, 2·s·q each, half of them under the causal mask
        "layernorm": 0.0,
    }
    if not is_moe:
        parts["mlp"] = 6.0 * h * m.ffn_hidden_size  # SwiGLU: three h×ffn matmuls
        return parts
    moe = m.moe
    assert moe.num_experts is not None
    parts["moe"] = 2.0 * h * moe.num_experts + moe.top_k * 6.0 * h * (moe.ffn_hidden_size or m.ffn_hidden_size)
    if moe.shared_expert_ffn_hidden_size:
        parts["shared_experts"] = 6.0 * h * moe.shared_expert_ffn_hidden_size
        parts["moe"] += parts["shared_experts"]
    return parts


def layer_totals(m: ModelConfig) -> list[float]:
    """Forward FLOPs per token of each layer (each layer kind computed once)."""
    kinds = {
        is_moe: sum(_without_nested(layer_forward_flops(m, is_moe)).values())
        for is_moe in (False, True)
        if is_moe is False or m.moe.num_experts is not None
    }
    return [kinds[is_moe] for is_moe in moe_layer_pattern(m)]


def model_forward_flops(m: ModelConfig, vocab: int) -> float:
    """Forward FLOPs per token of the whole model: every layer and the output layer."""
    return sum(layer_totals(m)) + 2.0 * m.hidden_size * vocab


def attention_flops_per_pair(m: ModelConfig) -> float:
    """Training FLOPs of one attended (query, key) pair over all layers: QK^T and PV, 2 · heads ·
    head_dim each, forward and backward (× 3), as `core_attn` counts them. Causal attention over s
    tokens counts s²/2 pairs; attention inside documents Σ n²/2 over its documents."""
    return 12.0 * m.num_layers * m.num_attention_heads * head_dim(m)


def recompute_forward_flops(m: ModelConfig, chunks: int = 1) -> float:
    """Extra forward FLOPs per token that the recipe's recompute reruns in the backward; `chunks`:
    model chunks over the pipeline (full/block recomputes that many layers of each)."""
    pattern = moe_layer_pattern(m)
    if m.recompute_granularity is None:
        return 0.0
    if m.recompute_granularity == "full":
        every = layer_totals(m)
        if m.recompute_method == "uniform":
            return float(sum(every))
        return float(sum(every)) * min(1.0, (m.recompute_num_layers or 0) * chunks / max(len(pattern), 1))
    modules = m.recompute_modules or ["core_attn"]
    rerun = {}
    for is_moe in set(pattern):
        parts = layer_forward_flops(m, is_moe)
        rerun[is_moe] = sum(
            parts.get(mod, 0.0) for mod in modules if not (mod == "shared_experts" and "moe" in modules)
        )
    return sum(rerun[is_moe] for is_moe in pattern)


def _without_nested(parts: dict[str, float]) -> dict[str, float]:
    """Drop shared_experts when it is already inside moe (it is listed for recompute only)."""
    return {k: v for k, v in parts.items() if not (k == "shared_experts" and "moe" in parts)}

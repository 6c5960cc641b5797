"""Forward FLOPs of each part of the model per token (matmuls at 2 FLOPs per multiply-add; causal
attention counts half the score matrix): what recompute reruns, and the planner's compute time."""

from __future__ import annotations

import dataclasses

from model.config import ModelConfig, head_dim
from model.moe_config import moe_layer_pattern


def attention_gemms(m: ModelConfig) -> list[tuple[int, int, bool]]:
    """The attention block's linears per token: (input width, output width, split over the tensor
    ranks). Standard: the fused QKV and the output projection. MLA (megatron-core's MLASelfAttention):
    the query down- and up-projections (one full-rank projection without q_lora_rank), the key/value
    down-projection (latent plus the shared RoPE key, replicated), their up-projection to every head's
    key without RoPE and value, and the output projection."""
    h, heads = m.hidden_size, m.num_attention_heads
    if m.attention == "mla":
        a = m.mla
        qk = a.qk_head_dim + a.qk_pos_emb_head_dim
        query = [(h, heads * qk, True)]
        if a.q_lora_rank is not None:
            query = [(h, a.q_lora_rank, False), (a.q_lora_rank, heads * qk, True)]
        kv_down = (h, a.kv_lora_rank + a.qk_pos_emb_head_dim, False)
        kv_up = (a.kv_lora_rank, heads * (a.qk_head_dim + a.v_head_dim), True)
        return [*query, kv_down, kv_up, (heads * a.v_head_dim, h, True)]
    q = heads * head_dim(m)  # = h unless model.head_dim says otherwise
    kv = (m.num_query_groups or heads) * head_dim(m)
    return [(h, q + 2 * kv, True), (q, h, True)]


def attention_widths(m: ModelConfig) -> tuple[int, int]:
    """(query/key, value) widths over all heads: QK^T multiplies the first per attended pair, PV the
    second (MLA: qk_head_dim + qk_pos_emb_head_dim and v_head_dim per head)."""
    heads = m.num_attention_heads
    if m.attention == "mla":
        return heads * (m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim), heads * m.mla.v_head_dim
    return heads * head_dim(m), heads * head_dim(m)


def layer_forward_flops(m: ModelConfig, is_moe: bool) -> dict[str, float]:
    """Forward FLOPs per token of one layer, by the module names recompute uses (norms are
    memory-bound and counted as free)."""
    h = m.hidden_size
    qk, v = attention_widths(m)
    parts = {
        "attention_linears": sum(2.0 * k * n for k, n, _ in attention_gemms(m)),
        "core_attn": m.seq_length * (qk + v),  # QK^T and PV, 2·s·width each, half of them under the causal mask
        "layernorm": 0.0,
    }
    if m.attention == "mla":  # selective mla_up_proj reruns the split (up-)projections, not the output one
        parts["mla_up_proj"] = sum(2.0 * k * n for k, n, split in attention_gemms(m)[:-1] if split)
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
    """Forward FLOPs per token of the whole model: every layer, the output layer and the MTP modules."""
    return sum(layer_totals(m)) + 2.0 * m.hidden_size * vocab + mtp_forward_flops(m, vocab)


def mtp_forward_flops(m: ModelConfig, vocab: int) -> float:
    """Forward FLOPs per token of the multi-token prediction modules (model/mtp.py): each one's
    [2h -> h] projection, its transformer layer (MoE where layer num_layers of the main model would
    be) and its pass through the shared output layer; the loss, norms and embedding lookup are free."""
    if not m.mtp_num_layers:
        return 0.0
    is_moe = moe_layer_pattern(dataclasses.replace(m, num_layers=m.num_layers + 1))[-1]
    layer = sum(_without_nested(layer_forward_flops(m, is_moe)).values())
    h = m.hidden_size
    return m.mtp_num_layers * (2.0 * 2 * h * h + layer + 2.0 * h * vocab)


def attention_flops_per_pair(m: ModelConfig) -> float:
    """Training FLOPs of one attended (query, key) pair over all layers: QK^T and PV, 2 · their
    widths, forward and backward (× 3), as `core_attn` counts them. Causal attention over s tokens
    counts s²/2 pairs; attention inside documents Σ n²/2 over its documents. MTP modules' layers attend too."""
    return 6.0 * (m.num_layers + m.mtp_num_layers) * sum(attention_widths(m))


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
    """Drop shared_experts when it is already inside moe, and mla_up_proj, inside attention_linears
    (both are listed for recompute only)."""
    return {k: v for k, v in parts.items() if k != "mla_up_proj" and not (k == "shared_experts" and "moe" in parts)}

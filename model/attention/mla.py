"""Multi-latent attention (DeepSeek-V2/V3) through megatron-core's MLASelfAttention on our local
layers: the `model.mla` keys, the combinations refused, the TransformerConfig fields and the spec."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.errors import RecipeError
from common.schema import PositiveInt

if TYPE_CHECKING:
    from model.rope import RopeScalingConfig
    from parallel.config import ParallelConfig


@dataclass
class MlaConfig:
    """Used when model.attention = mla. Queries and keys/values pass through low-rank latents; each
    query/key head is qk_head_dim wide without RoPE plus qk_pos_emb_head_dim with it (that key part
    one per token, shared by the heads); values are v_head_dim wide."""

    q_lora_rank: PositiveInt | None = None  # query latent rank; null = a full-rank query projection
    kv_lora_rank: PositiveInt = 512  # key/value latent rank
    qk_head_dim: PositiveInt = 128  # query/key width per head without RoPE ("nope")
    qk_pos_emb_head_dim: PositiveInt = 64  # query/key width per head with RoPE
    v_head_dim: PositiveInt = 128  # value width per head


def check_mla(model: Any, parallel: ParallelConfig) -> None:
    """What MLA cannot be combined with yet, each refused in one line. `model`: a ModelConfig
    (model/config.py, which imports this module)."""
    if model.attention != "mla":
        if model.rope_scaling.type == "yarn":
            raise RecipeError(
                "model.rope_scaling.type = yarn is built for model.attention = mla only (megatron-core's MLA "
                "applies it; the standard attention's RoPE takes llama3)"
            )
        return
    if model.transformer_impl != "local":
        raise RecipeError("model.attention = mla is built on the local spec only: set model.transformer_impl = local")
    for key in ("num_query_groups", "head_dim"):
        if getattr(model, key) is not None:
            raise RecipeError(
                f"model.{key} does not apply to model.attention = mla: set model.{key} = null "
                "(model.mla sets the head widths)"
            )
    if model.add_bias_linear:
        raise RecipeError(
            "model.add_bias_linear is not built for model.attention = mla: set model.add_bias_linear = false"
        )
    if model.qk_layernorm:
        raise RecipeError(
            "model.qk_layernorm does not apply to model.attention = mla: set model.qk_layernorm = false "
            "(its latents have their norms)"
        )
    if model.rope_scaling.type == "llama3":
        raise RecipeError(
            "model.rope_scaling.type = llama3 is not built for model.attention = mla (MLA applies its own "
            "RoPE: none or yarn)"
        )


def mla_parameters(mla: MlaConfig, hidden: int, heads: int, tensor: int = 1) -> int:
    """One MLA block's parameters on one tensor rank: the up-projections and the output projection
    are split over `tensor`, the down-projections and the latent norms replicated (megatron-core)."""
    qk = mla.qk_head_dim + mla.qk_pos_emb_head_dim
    if mla.q_lora_rank is None:
        query = hidden * heads * qk // tensor
    else:
        query = hidden * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * heads * qk // tensor
    kv_down = hidden * (mla.kv_lora_rank + mla.qk_pos_emb_head_dim) + mla.kv_lora_rank
    kv_up = mla.kv_lora_rank * heads * (mla.qk_head_dim + mla.v_head_dim) // tensor
    return query + kv_down + kv_up + heads * mla.v_head_dim * hidden // tensor


def mla_config_fields(mla: MlaConfig, rotary_base: float, scaling: RopeScalingConfig) -> dict[str, Any]:
    """MLATransformerConfig's fields for `model.mla`: RoPE at model.rotary_base, plain or with
    model.rope_scaling's yarn (megatron-core's YarnRotaryEmbedding and softmax scale)."""
    rope: dict[str, Any] = dict(rope_type="rope", mscale_all_dim=0.0)  # 0: no softmax mscale
    if scaling.type == "yarn":
        rope = dict(
            rope_type="yarn",
            rotary_scaling_factor=scaling.factor,
            original_max_position_embeddings=scaling.original_context,
            beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow,
            mscale=scaling.mscale,
            mscale_all_dim=scaling.mscale_all_dim,
        )
    return dict(
        multi_latent_attention=True,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_head_dim,
        qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
        v_head_dim=mla.v_head_dim,
        rotary_base=rotary_base,
        **rope,
    )


def use_mla(spec: Any) -> None:
    """Turns a local layer spec's attention into MLASelfAttention with RMSNorm on both latents
    (DeepSeek's q_a_layernorm and kv_a_layernorm); the core attention stays the caller's."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from model.layers import RMSNorm

    attention = get_gpt_layer_local_spec(multi_latent_attention=True, normalization="RMSNorm").submodules.self_attention
    attention.module = positioned_mla()
    attention.submodules.q_layernorm = RMSNorm  # built only with a query latent (q_lora_rank)
    attention.submodules.kv_layernorm = RMSNorm
    spec.submodules.self_attention = attention


@functools.cache
def positioned_mla() -> type:
    """megatron-core's MLASelfAttention that takes per-token positions: data.reset_position_ids
    hands each layer the position ids [b, s/cp] in `rotary_pos_emb` (megatron-core's MLA takes no
    rotary embedding there: model/attention/documents.py:gpt_model_with_positions), and the layer's
    RoPE is read at them for the call. Without them, upstream's MLA as it is."""
    import torch
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    class RopeAtPositions(torch.nn.Module):
        """An MLA layer's RoPE module (megatron-core's RotaryEmbedding or YarnRotaryEmbedding) read at
        each token's own position: `positions` [b, s/cp] -> [s/cp, b, 1, dim] (with YaRN's mscale),
        rows of the module's own table for the whole sample, so a position's angles are the ones it
        has without documents."""

        def __init__(self, rope: torch.nn.Module, positions: torch.Tensor):
            super().__init__()
            self.rope: Any = rope
            self.positions = positions

        def get_rotary_seq_len(self, *args: Any, **kwargs: Any) -> int:
            return self.rope.get_rotary_seq_len(*args, **kwargs)

        def forward(self, seq_len: int, packed_seq: bool = False) -> Any:
            table = self.rope.get_emb(seq_len)  # [s, 1, 1, dim] for the whole sample (yarn: and its mscale)
            emb, rest = (table[0], table[1:]) if isinstance(table, tuple) else (table, ())
            emb = emb[:, 0, 0][self.positions.t()].unsqueeze(2)  # [s/cp, b, 1, dim]
            return (emb, *rest) if rest else emb

    class PositionedMLASelfAttention(MLASelfAttention):
        def forward(self, hidden_states: Any, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
            positions = kwargs.pop("rotary_pos_emb", None)
            if positions is None:
                return super().forward(hidden_states, attention_mask, *args, **kwargs)
            rope: Any = getattr(self, "rotary_pos_emb")  # noqa: B009 (typed Any: megatron-core sets it in __init__)
            self.rotary_pos_emb = RopeAtPositions(rope, positions)
            try:
                return super().forward(hidden_states, attention_mask, *args, **kwargs)
            finally:
                self.rotary_pos_emb = rope

    return PositionedMLASelfAttention

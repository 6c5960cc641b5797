"""The `model.moe` recipe section (mixture of experts in place of the MLP), which layers it applies
to, and its checks against the model and the parallel layout."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal, Protocol

from common.errors import RecipeError, require_divides
from common.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from model.routing import check_groups
from parallel.config import ParallelConfig


@dataclass
class MoeConfig:
    """Mixture of experts in place of the MLP (megatron-core's MoELayer); num_experts: null = dense."""

    num_experts: PositiveInt | None = None  # routed experts per MoE layer; null = a dense model
    top_k: PositiveInt = 2  # experts per token
    ffn_hidden_size: PositiveInt | None = None  # SwiGLU inner size of one expert; null = model.ffn_hidden_size
    shared_expert_ffn_hidden_size: PositiveInt | None = None  # inner size of all shared experts together; null = none
    layer_freq: PositiveInt = 1  # every N-th layer is MoE (1 = all), counted after first_dense_layers
    first_dense_layers: NonNegativeInt = 0  # leading dense layers (DeepSeek's first_k_dense_replace)
    dense_layers: list[NonNegativeInt] = field(default_factory=list)  # 0-based, dense anyway (mlp_only_layers)
    score_function: Literal["softmax", "sigmoid"] = "softmax"  # router scores
    # group-limited routing (DeepSeek-V3): experts in num_groups equal groups, tokens routed within the
    # group_top_k groups of highest score (each group's top-2 sum with sigmoid); null = no groups
    num_groups: PositiveInt | None = None
    group_top_k: PositiveInt | None = None
    routed_scaling_factor: PositiveFloat | None = None  # routed experts' weights times this; null = 1
    # softmax over all experts, top-k unnormalized (norm_topk_prob false); false: over the top-k (renormalized)
    pre_softmax: bool = False
    # aux_loss: per micro-batch; seq_aux_loss: per sequence; global_aux_loss: global batch (docs/moe.md)
    load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: NonNegativeFloat = 1e-2  # weight of the load-balancing loss
    z_loss_coeff: NonNegativeFloat = 0.0  # weight of the router z-loss (logit size); 0 = off
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3): a routing bias nudged each step
    bias_update_rate: NonNegativeFloat = 1e-3  # expert-bias step size, per optimizer step
    capacity_factor: PositiveFloat | None = None  # tokens an expert takes, x its fair share; null = dropless
    drop_policy: Literal["probs", "position"] = "probs"  # over capacity, drop the lowest-probability or latest
    pad_to_capacity: bool = False  # pad every expert's input to its capacity (needs capacity_factor)
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"  # how tokens reach expert-parallel ranks
    # all local experts as grouped GEMMs: torch._grouped_mm (local spec, model/grouped_experts.py) or
    # transformer-engine's; false = one expert after another (megatron-core's SequentialMLP)
    grouped_gemm: bool = False


class Decoder(Protocol):
    """What the MoE checks read of the `model` section (model/config.py:ModelConfig)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def ffn_hidden_size(self) -> int: ...
    @property
    def add_bias_linear(self) -> bool: ...
    @property
    def transformer_impl(self) -> str: ...
    @property
    def moe(self) -> MoeConfig: ...


def moe_layer_pattern(model: Decoder) -> list[bool]:
    """Which layers are MoE: after `first_dense_layers`, every `layer_freq`-th, except `dense_layers`."""
    moe = model.moe
    dense = tuple(sorted(set(moe.dense_layers)))
    return list(_pattern(model.num_layers, moe.num_experts is not None, moe.first_dense_layers, moe.layer_freq, dense))


@functools.lru_cache(maxsize=64)  # the planner asks for it hundreds of thousands of times
def _pattern(layers: int, moe: bool, first_dense: int, freq: int, dense: tuple[int, ...]) -> tuple[bool, ...]:
    return tuple(moe and i >= first_dense and (i - first_dense) % freq == 0 and i not in dense for i in range(layers))


def _check_unread(moe: MoeConfig) -> None:
    """Keys whose setting would do nothing without another one: refused rather than ignored (a
    bias update rate without the bias is no aux-loss-free balancing; a drop policy without a capacity
    drops nothing)."""
    defaults = MoeConfig()
    if moe.bias_update_rate != defaults.bias_update_rate and not moe.expert_bias:
        raise RecipeError(
            f"model.moe.bias_update_rate = {moe.bias_update_rate} is only read with model.moe.expert_bias = true"
        )
    if moe.drop_policy != defaults.drop_policy and moe.capacity_factor is None:
        raise RecipeError(
            f"model.moe.drop_policy = {moe.drop_policy} is only read with model.moe.capacity_factor (without it "
            "no token is dropped)"
        )


def check_moe(model: Decoder, p: ParallelConfig) -> None:
    """`model.moe` against the model and the parallel layout (expert sizes, routing, biases)."""
    moe = model.moe
    if moe.num_experts is None:
        if p.expert > 1:
            raise RecipeError(f"parallel.expert = {p.expert} needs experts: set model.moe.num_experts")
        return
    if moe.top_k > moe.num_experts:
        raise RecipeError(f"model.moe.top_k = {moe.top_k} exceeds model.moe.num_experts = {moe.num_experts}")
    require_divides("parallel.expert", p.expert, "model.moe.num_experts", moe.num_experts)
    if moe.first_dense_layers >= model.num_layers:
        raise RecipeError(
            f"model.moe.first_dense_layers = {moe.first_dense_layers} leaves no MoE layer in "
            f"model.num_layers = {model.num_layers}"
        )
    if max(moe.dense_layers, default=0) >= model.num_layers or not any(moe_layer_pattern(model)):
        raise RecipeError(f"model.moe.dense_layers {moe.dense_layers} must be some of layers 0-{model.num_layers - 1}")
    check_groups(moe)
    if moe.expert_bias and moe.score_function != "sigmoid":
        raise RecipeError(
            f"model.moe.expert_bias = true needs model.moe.score_function = sigmoid, got {moe.score_function}"
        )
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise RecipeError("model.moe.pad_to_capacity = true needs model.moe.capacity_factor")
    _check_unread(moe)
    if moe.top_k == 1 and moe.score_function == "softmax" and not moe.pre_softmax:
        raise RecipeError(
            "model.moe.top_k = 1 with softmax scores needs model.moe.pre_softmax = true "
            "(a softmax over one expert is constant: the router would get no gradient)"
        )
    if p.tensor > 1 and not p.sequence_parallel:
        raise RecipeError(
            f"model.moe with parallel.tensor = {p.tensor} needs parallel.sequence_parallel = true "
            "(megatron-core's MoE layer refuses tensor parallelism without it)"
        )
    if moe.grouped_gemm and model.add_bias_linear:
        raise RecipeError(
            "model.moe.grouped_gemm = true cannot be combined with model.add_bias_linear = true "
            "(grouped experts have no linear biases, as megatron-core's GroupedMLP)"
        )
    if moe.grouped_gemm and p.fsdp is not None and model.transformer_impl == "local":
        raise RecipeError(
            f"model.moe.grouped_gemm = true with parallel.fsdp = {p.fsdp} is not verified: FSDP2 would "
            "shard the stacked expert weights by expert; set model.moe.grouped_gemm = false"
        )
    expert_tensor = p.expert_tensor or p.tensor
    if model.add_bias_linear and moe.shared_expert_ffn_hidden_size is not None:
        raise RecipeError(
            "model.add_bias_linear = true cannot be combined with "
            "model.moe.shared_expert_ffn_hidden_size (megatron-core's shared experts have no biases)"
        )
    if model.add_bias_linear and expert_tensor > 1:
        raise RecipeError(
            f"model.add_bias_linear = true with experts needs parallel.expert_tensor = 1, got "
            f"{expert_tensor} (megatron-core supports expert biases only without expert tensor parallelism)"
        )
    ffn = moe.ffn_hidden_size or model.ffn_hidden_size
    require_divides("parallel.expert_tensor", expert_tensor, "model.moe.ffn_hidden_size", ffn)

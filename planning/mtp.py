"""What the multi-token prediction modules (model/mtp.py) add to the last pipeline stage: their
parameters (and the embedding copy that stage keeps to embed the shifted tokens) and the
activations one micro-batch keeps through them."""

from __future__ import annotations

import dataclasses

from model.config import ModelConfig
from model.gpt import layer_parameters
from model.moe_config import moe_layer_pattern
from planning import activations as act
from planning.activations import FP32, Kernels, Shape


def mtp_is_moe(m: ModelConfig) -> bool:
    """Whether the MTP modules' layer is MoE: as a layer at index num_layers would be."""
    return moe_layer_pattern(dataclasses.replace(m, num_layers=m.num_layers + 1))[-1]


def mtp_stage_parameters(
    m: ModelConfig, vocab: int, pipeline: int, tensor: int, expert_tensor: int, local: int | None
) -> tuple[int, int]:
    """(dense, expert) parameters the MTP modules add to one rank of the last stage: each one's
    norms (enorm, hnorm, final), its column-parallel [2h -> h] projection and its layer; with more
    than one stage, the copy of the embedding (the first stage holds the original)."""
    if not m.mtp_num_layers:
        return 0, 0
    h, is_moe = m.hidden_size, mtp_is_moe(m)
    without = layer_parameters(m, is_moe, tensor=tensor, expert_tensor=expert_tensor, experts=0)
    expert = layer_parameters(m, is_moe, tensor=tensor, expert_tensor=expert_tensor, experts=local) - without
    dense = m.mtp_num_layers * (3 * h + 2 * h * h // tensor + without)
    if pipeline > 1:
        dense += vocab * h // tensor
    return dense, m.mtp_num_layers * expert


def mtp_items(m: ModelConfig, vocab: int, shape: Shape, kernels: Kernels, gloo: bool) -> list[tuple[int, int]]:
    """(kept, backward transient) per micro-batch of each MTP module, forward order: the shifted
    token ids (for the embedding's backward), enorm and hnorm with their concatenation (the
    projection's input), the layer under the recipe's recompute, and its own output layer and loss
    with the labels and loss mask shifted once more."""
    n_sp = shape.sharded_tokens
    is_moe = mtp_is_moe(m)
    parts = (act.moe_layer if is_moe else act.dense_layer)(m, shape, kernels)
    grad = act.backward_transient(m, shape, is_moe, gloo)
    if m.recompute_granularity == "selective":
        modules = list(m.recompute_modules or ["core_attn"])
        layer = (act.recompute_saved(parts, modules, shape, m), act.recompute_transient(parts, modules) + grad)
    elif m.recompute_granularity == "full":  # check_mtp allows uniform, 1 layer: the layer keeps its input
        layer = (n_sp * m.hidden_size * shape.dtype_bytes, act.layer_saved(parts) + grad)
    else:
        layer = (act.layer_saved(parts), grad)
    inputs = shape.tokens * 8 + 2 * act.norm_and_linear_input(m.hidden_size, n_sp, shape, kernels)
    kept, transient = act.logits_and_loss(m, vocab, shape, kernels)
    head = (kept + shape.tokens * (FP32 + 8), transient)  # and the shifted labels and loss mask
    return [(inputs, 0), layer, head] * m.mtp_num_layers

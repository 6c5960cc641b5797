"""Muon's terms in the memory model (docs/optimizers.md, "Cost"): the parameters AdamW still steps
under optimizer.name = muon, and the temporaries of Muon's step. `setup` is a planning.memory.Setup
(not imported: memory.py imports this module)."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig, moe_layer_pattern
from planning.activations import FP32


def adam_parameters(setup: Any, pipeline_rank: int) -> int:
    """Under optimizer.name = muon: the dense parameters of one rank of a stage that AdamW still
    steps (embedding, output layer, norms, biases); every other one is a Muon matrix. Expert
    biases, a rounding error, are counted as Muon's."""
    m, layout, vocab, tp = setup.model, setup.layout, setup.vocab, setup.layout.tensor
    h, bias = m.hidden_size, int(m.add_bias_linear)
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    qkv = (heads + 2 * groups) * (h // heads)
    layers = sum(b - a for a, b in setup.stage_ranges[pipeline_rank])
    per_layer = 2 * h + bias * (qkv // tp + h + 2 * m.ffn_hidden_size // tp + h)
    adam = layers * per_layer
    if pipeline_rank == 0:
        adam += vocab * h // tp
    if pipeline_rank == layout.pipeline - 1:
        adam += h + (vocab * h // tp if m.untie_embeddings or layout.pipeline > 1 else 0)
        adam += m.mtp_num_layers * 3 * h + (vocab * h // tp if m.mtp_num_layers and layout.pipeline > 1 else 0)
    return adam


def largest_muon_matrix(m: ModelConfig) -> int:
    """Elements of the largest whole matrix Muon orthogonalizes (QKV apart, fc1 as gate and up):
    every rank rebuilds it whole (gathered over tensor, data or FSDP ranks) for the iteration."""
    h, heads = m.hidden_size, m.num_attention_heads
    ffn = max(m.ffn_hidden_size, m.moe.ffn_hidden_size or 0, m.moe.shared_expert_ffn_hidden_size or 0)
    return max(ffn, heads * (h // heads)) * h


def muon_temporaries(setup: Any, pipeline_rank: int, expert_shards: int) -> int:
    """Bytes Muon's step holds at once beyond its state on one rank of a stage: for a whole matrix,
    the update, the gathered matrix, the iteration's X, (b G + c G^2) and next X; for grouped
    experts' stacks, what expert_stack_temporaries counts (`expert_shards`: the ranks the
    distributed optimizer shards an expert parameter's state over, 1 without it)."""
    whole = 5 * FP32 * largest_muon_matrix(setup.model)
    return max(whole, expert_stack_temporaries(setup, pipeline_rank, expert_shards))


def expert_stack_temporaries(setup: Any, pipeline_rank: int, expert_shards: int) -> int:
    """Bytes of the step of the larger of a stage's grouped-expert stacks (pretrain/muon.py
    _step_matrix), fp32, S the rank's stack [local experts, rows, cols / etp]: the nesterov update
    (S, or its distributed-optimizer range S / shards), the distributed optimizer's reassembled
    copy (S), the result cut to this rank's shard (S), and either gated fc1's [gate; up] rejoined
    (S) or, while one expert is orthogonalized, its piece gathered over the expert tensor ranks
    plus that expert's iteration (5 whole expert matrices). Measured: tests/unit/test_muon_memory.py."""
    m, layout, recipe = setup.model, setup.layout, setup.recipe
    pattern = moe_layer_pattern(m)
    stage = [pattern[i] for a, z in setup.stage_ranges[pipeline_rank] for i in range(a, z)]
    if not (m.moe.num_experts and m.moe.grouped_gemm and any(stage)):
        return 0
    local, etp = m.moe.num_experts // layout.expert, layout.expert_tensor or layout.tensor
    h, ffn = m.hidden_size, m.moe.ffn_hidden_size or m.ffn_hidden_size  # SwiGLU: fc1 gated
    distributed = recipe.parallel.distributed_optimizer and layout.fsdp is None
    worst = 0
    for parts, rows, cols in ((2, ffn, h), (1, h, ffn)):  # fc1 [gate; up], fc2
        stack = local * parts * rows * cols // etp
        update = (stack // expert_shards if distributed else stack) if recipe.optimizer.nesterov else 0
        held = update + (stack if distributed else 0) + stack  # + the result
        piece = stack // parts
        gathered = (2 * etp * piece if etp > 1 else 0) + 5 * rows * cols
        worst = max(worst, held + (stack if parts > 1 else 0), held + gathered)
    return FP32 * worst

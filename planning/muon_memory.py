"""Muon's terms in the memory model (docs/optimizers.md, "Cost"): the parameters AdamW still steps
under optimizer.name = muon, and the temporaries of Muon's step. `setup` is a planning.memory.Setup
(not imported: memory.py imports this module)."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
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


def muon_temporaries(setup: Any, pipeline_rank: int) -> int:
    """Bytes Muon's step holds at once beyond its state on one rank of a stage: the update whole,
    the gathered matrix, the iteration's X, (b G + c G^2) and next X."""
    return 5 * FP32 * largest_muon_matrix(setup.model)

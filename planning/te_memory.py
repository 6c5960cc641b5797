"""Transformer-engine's memory beyond what the local layers hold (docs/planner.md, "Memory per
implementation"): the FP8 weights each FP8 layer keeps. Read from TE's code, not measured (TE does
not run on the CPU); planning/memory.py adds these to its terms. `setup` is a planning.memory.Setup
(not imported: memory.py imports this module)."""

from __future__ import annotations

from typing import Any

from model.config import moe_layer_pattern
from model.gpt import layer_parameters
from planning.activations import fp8_layer


def fp8_weight_bytes(setup: Any, pipeline_rank: int) -> int:
    """Transformer-engine FP8 weights beyond the weights counted in the compute dtype: each FP8 layer's
    linears keep their weight quantized, row-wise for the forward GEMM and column-wise (on Hopper a
    transposed copy) for the data-gradient GEMM, 2 bytes per weight. Without fp8.params that is a
    workspace cached across micro-batches (megatron-core passes is_first_microbatch; TE keeps
    `_fp8_workspaces["weight"]`: module/linear.py, layernorm_linear.py forward, TE 2.x); with
    fp8.params (fp8_model_init) the weights themselves are FP8 tensors with their transpose, no
    bf16 copy: 2 bytes where the compute dtype counted b. Blackwell's FP8 GEMMs read either layout
    (no transpose): assumed the same here, which overstates it there."""
    m, fp8 = setup.model, setup.recipe.fp8
    if not (fp8.enabled and setup.target.kernels.transformer_engine):
        return 0
    tp, etp = setup.layout.tensor, setup.layout.expert_tensor or setup.layout.tensor
    local = m.moe.num_experts // setup.layout.expert if m.moe.num_experts else None
    pattern, h, linears = moe_layer_pattern(m), m.hidden_size, 0
    for a, z in setup.stage_ranges[pipeline_rank]:
        for i in (i for i in range(a, z) if fp8_layer(fp8, m.num_layers, i)):
            router = h * (m.moe.num_experts or 0) if pattern[i] else 0  # norms and the router stay bf16
            linears += layer_parameters(m, pattern[i], tensor=tp, expert_tensor=etp, experts=local) - 2 * h - router
    b = setup.shape.dtype_bytes
    return linears * (2 - b) if fp8.params else linears * 2

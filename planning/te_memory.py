"""Transformer-engine's memory beyond what the local layers hold (docs/planner.md, "Memory per
implementation"): the FP8 weights each FP8 layer keeps, and the userbuffers of parallel.tp_comm_overlap. Read from TE's code, not measured (TE does
not run on the CPU); planning/memory.py adds these to its terms. `setup` is a planning.memory.Setup
(not imported: memory.py imports this module)."""

from __future__ import annotations

from typing import Any

from model.gpt import layer_parameters
from model.moe_config import moe_layer_pattern
from parallel.tp_overlap import quantization_modes, userbuffer_shape
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


# transformer-engine's initialize_ub (module/base.py, TE 2.20) registers, for each quantization mode,
# one communicator per overlapped GEMM of a layer (shared by every layer), each with its own buffer
# of the userbuffer shape: the all-gather overlaps' buffers (qkv_fprop, fc1_fprop, proj_dgrad,
# fc2_dgrad by ring exchange; qkv_dgrad, fc1_dgrad in bulk; proj_wgrad, fc2_wgrad, "external")
# hold FP8 bytes in the FP8 set (`fp8_buf`), the reduce-scatter ones (proj_fprop, fc2_fprop
# pipelined; qkv_wgrad, fc1_wgrad in bulk) the compute dtype.
UB_ALL_GATHER_BUFFERS = 8
UB_REDUCE_SCATTER_BUFFERS = 4


def userbuffer_bytes(setup: Any) -> int:
    """parallel.tp_comm_overlap: the userbuffers every rank registers before the model is built
    (pretrain/trainer.py, parallel/tp_overlap.py), outside torch's allocator, for the whole run.
    Per set (tp_overlap.quantization_modes: FP8, and a plain one beside it for
    fp8.first_last_layers_bf16's layers) 12 buffers of [s·b/cp, h]: TE's CommOverlap allocates the
    shape as given, its ring-exchange CommOverlapP2P tensor chunks of [s·b/(cp·tensor), h] for an
    all-gather (comm_gemm_overlap.cpp; 2·tensor − 1 only for a ring-exchange reduce-scatter, which
    TE's defaults do not use). Not counted: the shared control region (about 3 MiB) and the rounding
    of each buffer to the driver's multicast granularity."""
    layout, recipe = setup.layout, setup.recipe
    if not (layout.tp_comm_overlap and setup.target.kernels.transformer_engine):
        return 0
    m, b = setup.model, setup.shape.dtype_bytes
    tokens, hidden = userbuffer_shape(m.seq_length, recipe.train.micro_batch_size, layout.context, m.hidden_size)
    total = 0
    for fp8 in quantization_modes(recipe.fp8.enabled, recipe.fp8.first_last_layers_bf16):
        total += tokens * hidden * (UB_ALL_GATHER_BUFFERS * (1 if fp8 else b) + UB_REDUCE_SCATTER_BUFFERS * b)
    return total

"""The data-parallel terms of the step time (planning/step_time.py): the gradient reduce-scatter
and weight all-gather of the distributed optimizer, of FSDP (every micro-batch) and of HSDP (within
a shard group), what of them the overlaps leave exposed, and HSDP's all-reduce across the groups."""

from __future__ import annotations

from model.gpt import layer_parameters
from model.moe_config import moe_layer_pattern
from planning.gpus import Gpu
from planning.memory import Setup

# megatron-core's default gradient bucket (parameters) with overlap_grad_reduce: the last bucket's
# reduce-scatter cannot overlap anything (distributed_data_parallel_config.py, bucket_size)
DEFAULT_BUCKET = 40_000_000


def data_parallel_seconds(setup: Setup, gpu: Gpu, params: int) -> tuple[float, float]:
    """(reduce-scatter, all-gather) seconds a step: fp32 gradients reduce-scattered and the updated
    weights all-gathered in the compute dtype over the data × context ranks (a plain all-reduce moves
    as much), on the slowest link the group spans; `params`: the busiest stage's parameters on one
    rank before any data-parallel sharding. FSDP (torch FSDP2) does both every micro-batch, zero3
    gathering twice (forward and backward): megatron-core's FSDP2 wrapper's no_sync is the base
    class's no-op (pretrain/step.py passes it), so each backward reduce-scatters into the sharded
    gradients. HSDP: FSDP's collectives stay within a shard group (hsdp_replica_seconds adds the rest)."""
    layout = setup.layout
    dp = layout.fsdp_shards if layout.fsdp else layout.data * layout.context
    if dp == 1:
        return 0.0, 0.0
    span = layout.world_size if layout.fsdp_replicas == 1 else layout.tensor * dp  # a group's consecutive ranks
    wire = params * (dp - 1) / dp / gpu.bandwidth(span) * (setup.micro_batches if layout.fsdp else 1)
    gathers = 2 if layout.fsdp == "zero3" else 1
    return 4 * wire, gathers * setup.shape.dtype_bytes * wire


def data_parallel_exposed(
    setup: Setup, params: int, reduce_scatter: float, all_gather: float, micro_batch: float, forward: float
) -> tuple[float, float]:
    """What the step waits for: with overlap_grad_reduce the reduce-scatter runs bucket by bucket
    under the last micro-batch's backward (only the last bucket is left over); with
    overlap_param_gather the all-gather runs under the first micro-batch's forward; without overlap
    both are exposed. FSDP: _fsdp_exposed."""
    p = setup.recipe.parallel
    if reduce_scatter == 0.0:
        return 0.0, 0.0
    if setup.layout.fsdp is not None:
        return _fsdp_exposed(setup, params, reduce_scatter, all_gather, micro_batch, forward)
    bucket = min(1.0, (p.bucket_size or max(DEFAULT_BUCKET, 1_000_000 * setup.layout.data)) / max(params, 1))
    backward = micro_batch - forward
    rs = reduce_scatter
    if p.grad_reduce_overlapped:
        rs = max(reduce_scatter - backward, bucket * reduce_scatter)
    ag = all_gather
    if p.param_gather_overlapped:
        ag = max(all_gather - forward, bucket * all_gather)
    return rs, ag


def _fsdp_exposed(
    setup: Setup, params: int, reduce_scatter: float, all_gather: float, micro_batch: float, forward: float
) -> tuple[float, float]:
    """FSDP2 overlaps per sharding unit (a layer, the embedding, the root), every micro-batch: the
    forward's gathers run ahead of the unit computing (so the first unit's waits), the backward's
    reduce-scatters (and zero3's second gather, on the same links) behind the units still computing
    (so the last unit's is left over). Per micro-batch and pass: max(traffic - compute, the largest
    unit's share of the traffic). Returned as (reduce-scatter, all-gather) for the whole step."""
    mb = setup.micro_batches
    rs, ag = reduce_scatter / mb, all_gather / mb
    unit = _fsdp_unit_fraction(setup, params)
    ag_forward = ag / 2 if setup.layout.fsdp == "zero3" else ag
    ag_backward = ag - ag_forward
    exposed_forward = max(ag_forward - forward, unit * ag_forward)
    backward_traffic = rs + ag_backward
    exposed_backward = max(backward_traffic - (micro_batch - forward), unit * backward_traffic)
    rs_share = rs / backward_traffic
    return mb * exposed_backward * rs_share, mb * (exposed_forward + exposed_backward * (1 - rs_share))


def _fsdp_unit_fraction(setup: Setup, params: int) -> float:
    """The largest FSDP sharding unit (parallel/data_parallel.py:wrap_fully_sharded: each layer, the
    embedding or the output layer) as a fraction of the stage's parameters."""
    m, layout = setup.model, setup.layout
    tp, etp = layout.tensor, layout.expert_tensor or layout.tensor
    local = m.moe.num_experts // layout.expert if m.moe.num_experts else None
    layer = max(
        layer_parameters(m, kind, tensor=tp, expert_tensor=etp, experts=local) for kind in set(moe_layer_pattern(m))
    )
    return min(1.0, max(layer, setup.vocab * m.hidden_size // tp) / max(params, 1))


def hsdp_replica_seconds(setup: Setup, gpu: Gpu, params: int) -> float:
    """HSDP (parallel.fsdp_shard_size): the fp32 gradient shards (params / shard size) all-reduced
    across the R shard groups once per step after the backward, 2 (R - 1) / R on the wire, over the
    network when the groups span nodes; exposed (parallel/data_parallel.py all_reduce_replicas runs
    after the backward). 0 without HSDP."""
    layout = setup.layout
    r = layout.fsdp_replicas
    if r == 1:
        return 0.0
    shard = params / layout.fsdp_shards
    return 4.0 * shard * 2 * (r - 1) / r / gpu.bandwidth(layout.world_size)

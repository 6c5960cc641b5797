"""optimizer.cpu_offload before launch: what it moves to host memory and what the step pays for it
(megatron-core's HybridDeviceOptimizer; docs/optimizers.md, "Optimizer state on the host")."""

from __future__ import annotations

from planning.gpus import Gpu
from planning.memory import FP32, Setup, stage_parameters, state_shards

# Host memory bandwidth one rank's AdamW step gets, GB/s: a two-socket host's ~600 GB/s shared by
# its 8 GPUs' processes. torch's fused CPU AdamW is memory-bound. An assumption, to measure.
HOST_ADAM_GBS = 75.0
# Bytes the host step moves per element: reads weight, gradient and both moments (16), writes the
# weight and both moments (12).
HOST_ADAM_BYTES = 28


def offloaded_elements(setup: Setup, pipeline_rank: int) -> int:
    """Elements of this rank's optimizer shard (the whole stage without the distributed optimizer)
    stepped on the host: optimizer.offload_fraction of them, 0 without offload."""
    cfg = setup.recipe.optimizer
    if not cfg.cpu_offload:
        return 0
    shards = state_shards(setup.layout, setup.recipe.parallel.distributed_optimizer)
    params = zip(("dense", "expert"), stage_parameters(setup, pipeline_rank))
    return int(cfg.offload_fraction * sum(n // shards[kind].optimizer for kind, n in params))


def host_state(setup: Setup, pipeline_rank: int) -> int:
    """Host bytes per rank: per offloaded element an fp32 copy of the weight and of its gradient
    and Adam's two fp32 moments (16 bytes). The device keeps the weight (the fp32 parameter or
    master shard) and its gradient; the moments leave it (planning/memory.py static_state)."""
    return 4 * FP32 * offloaded_elements(setup, pipeline_rank)


def offload_seconds(setup: Setup, gpu: Gpu) -> float:
    """Seconds the busiest stage's rank adds per step: the fp32 gradients of the offloaded elements
    copied to the host and the updated fp32 weights back (8 bytes each over Gpu.host_link_gbs), and
    torch's AdamW on them at host memory bandwidth. Not overlapped with each other or with compute
    (megatron-core's overlap_cpu_optimizer_d2h_h2d is off)."""
    elements = max(offloaded_elements(setup, p) for p in range(setup.layout.pipeline))
    link = gpu.host_link_gbs * 1e9
    return elements * 2 * FP32 / link + elements * HOST_ADAM_BYTES / (HOST_ADAM_GBS * 1e9)


def host_lines(setup: Setup) -> list[str]:
    """The report's line for optimizer.cpu_offload: host bytes per rank on the worst stage."""
    if not setup.recipe.optimizer.cpu_offload:
        return []
    host = max(host_state(setup, p) for p in range(setup.layout.pipeline))
    share = setup.recipe.optimizer.offload_fraction
    return [
        f"host memory per rank (optimizer.cpu_offload, {share:.0%} of the optimizer's elements): "
        f"{host / 2**30:.2f} GiB (fp32 weight and gradient copies, Adam's moments; not in the table)"
    ]

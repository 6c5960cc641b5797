"""Data parallelism over the model chunks: megatron-core's DistributedDataParallel, gradient
buffers reduced in fp32, optionally sharded with the distributed optimizer."""

from __future__ import annotations

from typing import Any


def wrap_data_parallel(
    chunks: list[Any], distributed_optimizer: bool, groups: Any, fp8_param_gather: bool = False
) -> list[Any]:
    """Each model chunk in megatron-core's DDP; only the first chunk buckets its gradients (the
    virtual-pipeline chunks after it are reduced whole), as Megatron-LM does. `fp8_param_gather`:
    transformer-engine's FP8 weights (fp8.params), kept and all-gathered in FP8."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
        fp8_param_gather=fp8_param_gather,
    )
    return [
        DistributedDataParallel(c.config, ddp_config, c, disable_bucketing=i > 0, pg_collection=groups)
        for i, c in enumerate(chunks)
    ]

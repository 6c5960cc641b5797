"""Data parallelism over the model chunks: megatron-core's DistributedDataParallel (gradient buffers
reduced in fp32, optionally the distributed optimizer), or fully sharded through megatron-core's
torch FSDP2 wrapper (parallel.fsdp: zero2 / zero3)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from common.errors import RecipeError


def wrap_data_parallel(
    chunks: list[Any],
    distributed_optimizer: bool,
    groups: Any,
    *,
    fsdp: str | None = None,
    fp8_param_gather: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    bucket_size: int | None = None,
) -> list[Any]:
    """Each model chunk in megatron-core's DDP, or fully sharded when `fsdp` is zero2 / zero3.
    `fp8_param_gather`: transformer-engine's FP8 weights (fp8.params), kept and all-gathered in FP8.
    The overlaps are parallel.overlap_* resolved (ParallelConfig.grad_reduce_overlapped, ...): with
    `overlap_param_gather` the model's weights are current only after a forward or `sync_params`."""
    if fsdp is not None:
        return [wrap_fully_sharded(c, fsdp, groups) for c in chunks]
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        bucket_size=bucket_size,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
        fp8_param_gather=fp8_param_gather,
    )
    # Only the first chunk buckets its gradients (the virtual-pipeline chunks after it are reduced
    # whole), as Megatron-LM does.
    return [
        DistributedDataParallel(c.config, ddp_config, c, disable_bucketing=i > 0, pg_collection=groups)
        for i, c in enumerate(chunks)
    ]


def sync_params(chunks: Sequence[Any]) -> None:
    """Makes every model weight current where the distributed optimizer's overlapped all-gather
    (parallel.overlap_param_gather) has left it to the next forward: before a checkpoint is saved.
    A no-op otherwise. Gathers synchronously; the next forward then finds the weights gathered."""
    from megatron.core.distributed import DistributedDataParallel

    for chunk in chunks:
        if isinstance(chunk, DistributedDataParallel) and chunk.use_forward_hook:
            chunk.start_param_sync(force_sync=True)


def wrap_fully_sharded(chunk: Any, fsdp: str, groups: Any) -> Any:
    """One model chunk under torch FSDP2 (megatron-core's TorchFullyShardedDataParallel): each
    transformer layer, the embedding (unless the output layer shares its weight) and the root are
    sharding units over the data × context-parallel ranks; expert-parallel experts are units over their expert-data-parallel ranks. zero3 frees each
    unit's gathered weights after its forward and gathers them again for the backward; zero2 keeps
    them until the backward. The parameters stay the fp32 master weights: with bf16 the units gather
    them as bf16 for compute and reduce-scatter gradients in fp32. (upstream/fsdp.py gives
    megatron-core's wrapper that precision, per-token gradient sums and the experts' groups.)"""
    from megatron.core.distributed import TorchFullyShardedDataParallel, TorchFullyShardedDataParallelConfig
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_layer import TransformerLayer

    ddp_config = TorchFullyShardedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        check_for_nan_in_grad=False,
        reshard_after_forward=fsdp == "zero3",
    )
    units = {TransformerLayer, RotaryEmbedding}
    if not getattr(chunk, "share_embeddings_and_output_weights", False):
        # A tied output layer multiplies by the embedding's weight outside the embedding's forward,
        # where a unit of its own has already freed it ("aten.mm.default got mixed torch.Tensor and
        # DTensor"): tied, the embedding stays in the root unit, gathered for the whole step.
        units.add(LanguageModelEmbedding)
    # groups.intra_dp_cp: the HSDP shard group (parallel.fsdp_shard_size), all of dp_cp without it
    wrapped = TorchFullyShardedDataParallel(
        chunk.config, ddp_config, chunk, sub_modules_to_wrap=units, process_group=groups.intra_dp_cp
    )
    check_even_shards(wrapped)
    replicas = groups.inter_dist_opt
    if replicas is not None and replicas.size() > 1:
        wrapped.replica_group = replicas  # HSDP: the ranks holding this rank's shards in the other groups
        wrapped.finish_grad_sync = functools.partial(all_reduce_replicas, wrapped, replicas)
    return wrapped


def all_reduce_replicas(chunk: Any, replicas: Any, force_all_reduce: bool = False) -> None:
    """HSDP's second reduction (finalize_model_grads calls it as the chunk's finish_grad_sync): each
    shard group has reduce-scattered its ranks' gradients into their shards; the shard groups'
    sums of the same shard are summed over `replicas`, the ranks holding it in the other groups.
    Once per step, after the backward (not overlapped with it)."""
    import torch.distributed as dist

    for param in chunk.module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad.to_local(), group=replicas)


def sharded_state_dict(chunk: Any) -> dict:
    """The model chunk's dist_checkpointing entries. Under HSDP each shard is addressed in its shard
    group (megatron-core addresses FSDP shards in the `dp_cp_group` it is given) and held by every
    shard group: the copies outside the first group are marked replicas (their data-parallel
    replica id moved past the shard group's)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    module = getattr(chunk, "module", chunk)  # DDP and FSDP -> the model; a bare model too
    replicas = getattr(chunk, "replica_group", None)
    if replicas is None:
        # megatron-core's default group, given: GPTModel.sharded_state_dict reads metadata["dp_cp_group"]
        # from its caller's metadata for the MTP stage's embedding copy (gpt_model.py:842, pipeline > 1)
        return module.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
    state = module.sharded_state_dict(metadata={"dp_cp_group": chunk.process_group})
    offset = chunk.process_group.size() * replicas.rank()
    for item in nested_values(state):
        rid = item.replica_id
        item.replica_id = (*rid[:-1], rid[-1] + offset) if isinstance(rid, tuple) else rid + offset
    return state


def check_even_shards(chunk: Any) -> None:
    """Refuses a layout whose FSDP shards are uneven: megatron-core addresses a shard in a checkpoint
    as an equal slice of its parameter (utils.py:966-976), and a gated MLP's fc1 shard must lie in
    one of its [gate; up] halves (upstream/fsdp.py:gated_fc1_shards)."""
    from torch.distributed.tensor import DTensor

    for name, param in chunk.module.named_parameters():
        if isinstance(param, DTensor):
            problem = uneven_shards(name, param.shape[0], param.device_mesh.size(), chunk.config.gated_linear_unit)
            if problem:
                raise RecipeError(problem)


def uneven_shards(name: str, rows: int, ranks: int, gated: bool) -> str | None:
    """Why parameter `name` (`rows` rows on its tensor-parallel rank) cannot be sharded over `ranks`
    FSDP ranks (data × context-parallel; expert-data-parallel for experts), or None."""
    where = f"the {ranks} ranks it is sharded over (data × context-parallel, or expert-data-parallel for experts)"
    if rows % ranks:
        return (
            f"parallel.fsdp: {name} has {rows} rows per tensor-parallel rank, which do not split evenly over "
            f"{where}; choose sizes that divide {rows}"
        )
    if gated and name.rsplit(".", 1)[0].endswith("linear_fc1") and ranks > 1 and ranks % 2:
        return (
            f"parallel.fsdp: {name} is [gate; up], and each of {where} must hold rows of one half: use an even number"
        )
    return None


def local_gradients(chunks: Sequence[Any]) -> Iterator[torch.Tensor]:
    """The gradient storage this rank holds, reduced or not: DDP's flat buffers (dense and expert),
    or the local shards of the fully sharded parameters' gradients."""
    from megatron.core.distributed import DistributedDataParallel
    from torch.distributed.tensor import DTensor

    for chunk in chunks:
        if isinstance(chunk, DistributedDataParallel):
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                yield buffer.grad_data
            continue
        for param in chunk.parameters():
            grad = param.grad
            if grad is not None:
                yield grad.to_local() if isinstance(grad, DTensor) else grad


def load_module_state(chunk: Any, state: dict) -> None:
    """Loads `state` (the model's entries of a dist_checkpointing load) into the wrapped module.

    Fully sharded, each loaded tensor is this rank's shard of a parameter (the sharded tensors are
    built on the shards), while the module's parameters are DTensors: each shard is viewed as a
    DTensor with its parameter's placement, so the load copies shard to shard."""
    from torch.distributed.tensor import DTensor

    module = getattr(chunk, "module", chunk)  # a bare model too (conversion tools)
    current = module.state_dict(keep_vars=True)
    for key, value in state.items():
        target = current.get(key)
        if isinstance(target, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            state[key] = DTensor.from_local(
                value, target.device_mesh, target.placements, shape=target.shape, stride=target.stride()
            )
    module.load_state_dict(state)

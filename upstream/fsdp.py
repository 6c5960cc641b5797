"""Named fixes for megatron-core 0.16's torch FSDP2 path (TorchFullyShardedDataParallel) on any device.

Each function below is what one `Patch` (listed in `patches()`, applied with upstream/fixes.py's
FIXES once per process) puts at an upstream site, and says what goes wrong without it;
tests/distributed/test_fsdp.py reverts each to show its site failing. The CPU-only part (the
wrapper's CUDA device mesh) is upstream/cpu.py's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from upstream.patch import Patch


def _finish_grad_sync(self: Any, force_all_reduce: bool = False) -> None:
    """finalize_model_grads calls `finish_grad_sync(force_all_reduce=...)` on every chunk, but
    megatron-core's torch FSDP2 wrapper inherits the base class's `finish_grad_sync(self)`:
    "TypeError: _BaseDataParallel.finish_grad_sync() got an unexpected keyword argument
    'force_all_reduce'" at the first step, GPU or not. FSDP2 reduce-scatters in its own backward
    hooks, so there is nothing to finish and nothing to force."""
    return None


def _scale_gradients(self: Any, scaling_factor: float) -> None:
    """With calculate_per_token_loss (ours, always) finalize_model_grads divides the gradients by
    the global token count through `scale_gradients`, which megatron-core's torch FSDP2 wrapper
    inherits as a no-op: every gradient stays a token *sum*, the step's token count times too large
    (64x in tests/distributed/test_fsdp.py). The wrapper's gradients are its parameters' sharded
    `.grad`s."""
    with torch.no_grad():
        for param in self.module.parameters():
            if param.grad is not None:
                param.grad.mul_(scaling_factor)


def _shard_with_precision_sums_and_expert_groups(original: Callable) -> Callable:
    """megatron-core's torch FSDP2 wrapper calls `fully_shard` with one mesh and
    reshard_after_forward only (torch_fully_sharded_data_parallel.py:82-85,134,144), so:
    - mixed precision is lost: config.bf16/fp16 and ddp_config.grad_reduce_in_fp32 never reach
      FSDP2, whose units compute and reduce in the parameters' own dtype;
    - gradients are *averaged* over the data-parallel ranks (FSDP2's default), while with
      calculate_per_token_loss megatron-core sums them and divides by the global token count
      itself: they come out 1/dp of the single-process ones;
    - expert parameters are sharded over the dense data × context-parallel group, but they belong
      to the expert-data-parallel group. Under expert parallelism the dense group's ranks hold
      *different* experts: each keeps a slice of its own, and the all-gather stitches slices of
      different experts together (tiny_moe at EP 2: loss 5.9961 vs 5.9935 at step 1). With an
      expert tensor size other than the tensor size the expert group spans ranks the dense one
      does not, whose gradient contributions never arrive (tiny_moe at TP 2 + SP, expert tensor 1:
      loss 2.3e-4 and grad norm 2.8e-3 off). No error either way.
    The construction runs with `fully_shard` given the precision as a MixedPrecisionPolicy (compute
    in bf16/fp16, reduce in fp32 with grad_reduce_in_fp32), and sharding each experts module whose
    expert-data-parallel group is not the dense group first, over its own group; then, for
    per-token losses, every unit sums its reduce-scatter with SUM collectives (a divide factor of 1
    alone would use NCCL's PREMUL_SUM, which gloo does not have)."""
    from megatron.core.distributed import torch_fully_sharded_data_parallel as torch_fsdp

    @functools.wraps(original)
    def __init__(self, config, ddp_config, module, *args, **kwargs):
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

        compute = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
        policy = MixedPrecisionPolicy(
            param_dtype=compute, reduce_dtype=torch.float32 if ddp_config.grad_reduce_in_fp32 else None
        )
        plain = torch_fsdp.fully_shard
        dense = _group_ranks(_process_group(args, kwargs))

        def fully_shard(unit: torch.nn.Module, **options: Any) -> Any:
            # Called for each unit after upstream has recorded the parameters' attributes (and
            # before it restores them), so the experts sharded here keep theirs too.
            for experts in _experts_off_the_group(unit, dense):
                mesh = torch_fsdp.DeviceMesh.from_group(experts.dp_group, "cuda")
                plain(experts, **{**options, "mesh": mesh}, mp_policy=policy)
            return plain(unit, mp_policy=policy, **options)

        torch_fsdp.fully_shard = fully_shard
        try:
            original(self, config, ddp_config, module, *args, **kwargs)
        finally:
            torch_fsdp.fully_shard = plain
        if config.calculate_per_token_loss:
            for unit in self.module.modules():
                if isinstance(unit, FSDPModule):
                    unit.set_gradient_divide_factor(1.0)
                    unit.set_force_sum_reduction_for_comms(True)

    return __init__


def _process_group(args: tuple, kwargs: dict) -> Any:
    """The wrapper's `process_group` argument (after sub_modules_to_wrap and disable_bucketing), or
    its default, the data × context-parallel group."""
    from megatron.core import parallel_state

    group = kwargs.get("process_group", args[2] if len(args) > 2 else None)
    return group if group is not None else parallel_state.get_data_parallel_group(with_context_parallel=True)


def _group_ranks(group: Any) -> list[int]:
    import torch.distributed as dist

    return sorted(dist.get_process_group_ranks(group))


def _experts_off_the_group(unit: torch.nn.Module, dense: list[int]) -> list[torch.nn.Module]:
    """The experts modules inside `unit` (itself included), not yet sharded, whose
    expert-data-parallel ranks are not the dense ones `dense`; others stay in their layer's unit."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from torch.distributed.fsdp import FSDPModule

    return [
        m
        for m in unit.modules()
        if isinstance(m, SequentialMLP) and not isinstance(m, FSDPModule) and _group_ranks(m.dp_group) != dense
    ]


def _to_local_if_dtensor(tensor: torch.Tensor) -> torch.Tensor:
    """dist_checkpointing maps each optimizer parameter to the model's sharded tensor by the `id` of
    its local tensor (dist_checkpointing/optimizer.py:39,61), taken with `to_local_if_dtensor`
    (utils.py:1066), i.e. `DTensor.to_local()`. Since torch 2.10, `to_local()` of a *parameter*
    returns a fresh view (torch gh-166156), so no FSDP2 parameter matches the `_local_tensor` the
    model's sharded tensors hold: "Sharded parameters mapping is empty", then "ValueError: Param id 0
    does not match any model sharded param" at the first save. The module's name is bound to the DTensor's own local tensor
    instead (what the model's sharded tensors hold; a view of it saved and loaded the same bytes)."""
    return getattr(tensor, "_local_tensor", tensor)


def _fp32_optimizer_loads_dtensor_state(original: Callable) -> Callable:
    """dist_checkpointing hands the optimizer each state tensor as this rank's *local* shard
    (dist_checkpointing/optimizer.py:96), and FP32Optimizer.load_state_dict (optimizer/optimizer.py:
    1001-1010) passes them to torch's Optimizer.load_state_dict, which puts them beside FSDP2's
    DTensor parameters as plain tensors: the first Adam step after a resume fails with
    "aten.lerp_.Scalar got mixed torch.Tensor and DTensor". Each shard gets its parameter's placement
    back."""

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        from torch.distributed.tensor import DTensor

        original(self, state_dict)
        for param, state in self.optimizer.state.items():
            if not isinstance(param, DTensor):
                continue
            for key, value in state.items():
                if key == "step" or isinstance(value, DTensor) or value.shape != param.to_local().shape:
                    continue
                state[key] = DTensor.from_local(
                    value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
                )

    return load_state_dict


def _gated_fc1_shards(original: Callable) -> Callable:
    """A gated MLP's fc1 is [gate; up] on each tensor-parallel rank, and its checkpoint entry is
    made by splitting the local tensor into those two halves (transformer/mlp.py:264,276-315).
    Under FSDP2 the local tensor is a dim-0 *slice* of [gate; up], which lies in one half: upstream
    still splits it in two and writes gate rows as up rows. Saving and loading at the same
    data-parallel size undo each other; any other size, or plain DDP, loads another model (tiny_gpt
    resumed at DP 1 from FSDP DP 2: loss 1e-3 off). Under FSDP the fc1 shards are written where
    they belong in the [gate; up] layout of every other layout; each half must split evenly over
    the FSDP ranks (parallel/data_parallel.py checks that when it shards the model)."""

    @functools.wraps(original)
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = original(self, prefix, sharded_offsets, metadata)
        shards = fsdp_shards(self.linear_fc1.weight)
        if not self.config.gated_linear_unit or shards == 1:
            return state
        plain = self.linear_fc1.sharded_state_dict(f"{prefix}linear_fc1.", sharded_offsets, metadata)
        for key in (f"{prefix}linear_fc1.weight", f"{prefix}linear_fc1.bias"):
            if key in plain:
                state[key] = _gated_half_shard(plain[key], sharded_offsets, shards)
        return state

    return sharded_state_dict


def fsdp_shards(param: torch.Tensor) -> int:
    """Ranks FSDP2 splits `param` over (1 for an ordinary tensor)."""
    mesh = getattr(param, "device_mesh", None)
    return 1 if mesh is None else mesh.size()


def _gated_half_shard(sharded: Any, sharded_offsets: tuple, shards: int) -> Any:
    """`sharded` (this rank's FSDP slice of a tensor-parallel [gate; up], as fragment
    tp_rank * shards + fsdp_rank of tp * shards) re-addressed in the [gate_0 .. gate_tp-1; up_0 ..
    up_tp-1] layout: fsdp ranks below shards / 2 hold gate rows, the others up rows."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    axis = len(sharded_offsets)  # dim 0 of the tensor, after the prepended (layer, expert) axes
    tp_rank, fsdp_rank = divmod(sharded.global_offset[axis] // sharded.local_shape[0], shards)
    tp_size, per_half = sharded.axis_fragmentations[axis] // shards, shards // 2
    half, index = divmod(fsdp_rank, per_half)
    return ShardedTensor.from_rank_offsets(
        sharded.key,
        sharded.data,
        *sharded_offsets,
        (axis, half * tp_size * per_half + tp_rank * per_half + index, tp_size * shards),
        replica_id=sharded.replica_id,
        prepend_axis_num=len(sharded_offsets),
    )


def _expert_shards_in_checkpoints(original: Callable) -> Callable:
    """SequentialMLP.sharded_state_dict (transformer/moe/experts.py:935-985) addresses its experts'
    shards with the dense data-parallel group (through `metadata['dp_cp_group']`) and then marks
    every expert tensor a replica on all but expert-data-parallel rank 0. Under FSDP2 each
    expert-data-parallel rank holds a *different* shard, so the save drops all but rank 0's
    ("Invalid access pattern for ShardedTensor(key='decoder.layers.0.mlp.experts.experts.
    linear_fc1.weight'...") and, at EP > 1, the shards are placed by the wrong group. Fully sharded
    experts are addressed in the experts' own group and no rank's shard is a replica."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from torch.distributed.tensor import DTensor

    @functools.wraps(original)
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        if not any(isinstance(p, DTensor) for p in self.local_experts.parameters()):
            return original(self, prefix, sharded_offsets, metadata)
        metadata = {**(metadata or {}), "dp_cp_group": self.dp_group}
        state = original(self, prefix, sharded_offsets, metadata)
        for sharded in state.values():
            if isinstance(sharded, (ShardedTensor, ShardedTensorFactory)):
                sharded.replica_id = (*sharded.replica_id[:2], 0)
        return state

    return sharded_state_dict


def patches() -> list[Patch]:
    """The FSDP2 fixes, in the order they are applied."""
    from megatron.core.dist_checkpointing import optimizer as dist_optim
    from megatron.core.distributed import TorchFullyShardedDataParallel as Wrapper
    from megatron.core.optimizer.optimizer import FP32Optimizer
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP

    return [
        Patch(
            "TorchFullyShardedDataParallel.finish_grad_sync",
            "distributed/finalize_model_grads.py:443, data_parallel_base.py:48",
            Wrapper,
            "finish_grad_sync",
            _finish_grad_sync,
            needed=lambda: "finish_grad_sync" not in vars(Wrapper),
        ),
        Patch(
            "TorchFullyShardedDataParallel.scale_gradients",
            "distributed/finalize_model_grads.py:493, data_parallel_base.py:40",
            Wrapper,
            "scale_gradients",
            _scale_gradients,
            needed=lambda: "scale_gradients" not in vars(Wrapper),
        ),
        Patch(
            "TorchFullyShardedDataParallel.__init__",
            "distributed/torch_fully_sharded_data_parallel.py:82-85,134,144",
            Wrapper,
            "__init__",
            wrap=_shard_with_precision_sums_and_expert_groups,
        ),
        Patch(
            "dist_checkpointing.optimizer.to_local_if_dtensor",
            "dist_checkpointing/optimizer.py:39,61",
            dist_optim,
            "to_local_if_dtensor",
            _to_local_if_dtensor,
        ),
        Patch(
            "FP32Optimizer.load_state_dict",
            "optimizer/optimizer.py:1001-1010",
            FP32Optimizer,
            "load_state_dict",
            wrap=_fp32_optimizer_loads_dtensor_state,
        ),
        Patch(
            "MLP.sharded_state_dict",
            "transformer/mlp.py:264,276-315",
            MLP,
            "sharded_state_dict",
            wrap=_gated_fc1_shards,
        ),
        Patch(
            "SequentialMLP.sharded_state_dict",
            "transformer/moe/experts.py:935-985",
            SequentialMLP,
            "sharded_state_dict",
            wrap=_expert_shards_in_checkpoints,
        ),
    ]

"""The parallel layout of a run: sizes, this rank's coordinates, and megatron-core's process groups."""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from common.errors import RecipeError, UserError
from parallel.config import ParallelConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes of each parallel axis; their product (with dp) is the world size. The constructor
    checks that they fit the world size (the section's own checks are ParallelConfig.check)."""

    world_size: int
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    context: int = 1
    expert: int = 1
    expert_tensor: int | None = None  # None = tensor
    sequence_parallel: bool = False
    context_comm: str = "p2p"  # megatron-core's cp_comm_type: p2p, a2a, a2a+p2p, all_gather (TE only)
    context_a2a: int | None = None  # ranks per all-to-all group with a2a+p2p; None otherwise
    first_stage_layers: int | None = None  # uneven pipeline split; None = even
    last_stage_layers: int | None = None
    fsdp: str | None = None  # zero2 | zero3 (parallel.fsdp); None = replicated weights
    # HSDP: ranks of one shard group (parallel.fsdp_shard_size), or "node": one node's; None = all
    fsdp_shard_size: int | str | None = None
    node_size: int | None = None  # processes per node (torchrun's LOCAL_WORLD_SIZE); resolves "node"
    tp_comm_overlap: bool = False  # parallel.tp_comm_overlap: TE userbuffers (parallel/tp_overlap.py)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise RecipeError(f"world size must be positive, got {self.world_size}")
        model_parallel = self.tensor * self.pipeline * self.context
        if self.world_size % model_parallel:
            raise RecipeError(
                f"parallel.tensor × parallel.pipeline × parallel.context = {model_parallel} "
                f"does not divide the world size {self.world_size}"
            )
        if (self.context_comm == "a2a+p2p") != (self.context_a2a is not None) or (
            self.context_a2a is not None and self.context % self.context_a2a
        ):
            raise RecipeError(
                f"parallel.context_a2a = {self.context_a2a} does not fit parallel.context_comm = "
                f"{self.context_comm} with parallel.context = {self.context}"
            )
        if self.fsdp_shard_size is not None and (self.data * self.context) % self.fsdp_shards:
            size = "node" if self.fsdp_shard_size == "node" else ""
            raise RecipeError(
                f"parallel.fsdp_shard_size = {size and f'node ({self.fsdp_shards} per node)' or self.fsdp_shards} "
                f"does not divide the {self.data * self.context} "
                f"data × context-parallel ranks (world size {self.world_size} / (tensor × pipeline))"
            )
        expert_tensor = self.expert_tensor or self.tensor
        expert_room = self.world_size // (expert_tensor * self.pipeline)
        if self.world_size % (expert_tensor * self.pipeline) or expert_room % self.expert:
            raise RecipeError(
                f"parallel.expert × parallel.expert_tensor = {self.expert} × {expert_tensor} does not "
                f"divide the world size / parallel.pipeline = {self.world_size // self.pipeline}"
            )

    @property
    def data(self) -> int:
        """The data-parallel size: ranks that hold distinct samples (named as the other axes are)."""
        return self.world_size // (self.tensor * self.pipeline * self.context)

    @property
    def fsdp_shards(self) -> int:
        """Ranks FSDP shards a dense parameter over: the shard group (HSDP), else data × context."""
        if self.fsdp_shard_size == "node":
            return self.node_shards()
        return int(self.fsdp_shard_size or self.data * self.context)

    def node_shards(self) -> int:
        """fsdp_shard_size = node: the data × context ranks on one node. A shard group is N
        consecutive data × context ranks, tensor × N consecutive global ranks in megatron-core's
        order (tensor innermost, then context, data, pipeline), so one node of G processes holds
        N = G / tensor of them (all of them when a pipeline stage fits in a node)."""
        if self.node_size is None:
            raise RecipeError(
                "parallel.fsdp_shard_size = node needs the processes per node: give the dry run "
                "--gpus-per-node N, or set parallel.fsdp_shard_size to a number"
            )
        node = min(self.node_size, self.world_size)
        if self.world_size % node or node % self.tensor:
            raise RecipeError(
                f"parallel.fsdp_shard_size = node: a node of {node} processes does not hold whole tensor-parallel "
                f"groups of the world of {self.world_size} (parallel.tensor = {self.tensor}): set "
                "parallel.fsdp_shard_size to a number"
            )
        return min(node // self.tensor, self.data * self.context)

    @property
    def fsdp_replicas(self) -> int:
        """HSDP: shard groups holding the same shards (1 = plain FSDP, or no FSDP)."""
        return self.data * self.context // self.fsdp_shards if self.fsdp else 1

    @property
    def hierarchical_context(self) -> list[int] | None:
        """[all-to-all group size, ring size] with a2a+p2p (megatron-core's
        hierarchical_context_parallel_sizes), else None."""
        if self.context_a2a is None:
            return None
        return [self.context_a2a, self.context // self.context_a2a]

    @property
    def model_chunks(self) -> int:
        """Model chunks held by one pipeline rank (virtual pipeline stages)."""
        return self.virtual_pipeline or 1

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world_size: int, node_size: int | None = None) -> Layout:
        """The section at a world size: every field but world_size and node_size (processes per
        node, for fsdp_shard_size = node) is the parallel key of its name."""
        own = ("world_size", "node_size")
        sizes = {f.name: getattr(parallel, f.name) for f in dataclasses.fields(cls) if f.name not in own}
        return cls(world_size=world_size, node_size=node_size, **sizes)

    def transformer_config_fields(self) -> dict[str, Any]:
        """megatron-core's TransformerConfig (ModelParallelConfig) fields for this layout: the one
        place its names are mapped to ours (model/gpt.py:transformer_config reads them)."""
        return dict(
            tensor_model_parallel_size=self.tensor,
            pipeline_model_parallel_size=self.pipeline,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline,
            num_layers_in_first_pipeline_stage=self.first_stage_layers,
            num_layers_in_last_pipeline_stage=self.last_stage_layers,
            context_parallel_size=self.context,
            cp_comm_type=self.context_comm,
            hierarchical_context_parallel_sizes=self.hierarchical_context,
            expert_model_parallel_size=self.expert,
            expert_tensor_parallel_size=self.expert_tensor or self.tensor,
            sequence_parallel=self.sequence_parallel,
            tp_comm_overlap=self.tp_comm_overlap,
        )

    def pipeline_bubble(self, micro_batches: int) -> float:
        """Idle fraction of a step in megatron-core's (interleaved) 1F1B schedule:
        (pp − 1) / (vpp · m + pp − 1) for pp stages, vpp chunks each, m micro-batches, equal-time stages."""
        pp, vpp = self.pipeline, self.model_chunks
        return (pp - 1) / (vpp * micro_batches + pp - 1)

    def _context_comm(self) -> str:
        if self.context == 1:
            return ""
        if self.context_a2a is not None:
            return f" (a2a {self.context_a2a} x p2p {self.context // self.context_a2a})"
        return f" ({self.context_comm})"

    def describe(self) -> str:
        vpp = f" (x{self.virtual_pipeline} virtual)" if self.virtual_pipeline else ""
        return (
            f"world {self.world_size} = tensor {self.tensor} x pipeline {self.pipeline}{vpp}"
            f" x context {self.context}{self._context_comm()} x data {self.data}; expert {self.expert}"
            + (f" x expert tensor {self.expert_tensor}" if self.expert_tensor else "")
            + (", sequence parallel" if self.sequence_parallel else "")
            + (f", fully sharded ({self.fsdp})" if self.fsdp else "")
            + (f" in groups of {self.fsdp_shards} x {self.fsdp_replicas} replicas" if self.fsdp_replicas > 1 else "")
            + (f" (fsdp_shard_size: node = {self.fsdp_shards})" if self.fsdp and self.fsdp_shard_size == "node" else "")
        )


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the layout (read from megatron-core after initialization)."""

    rank: int
    data_rank: int
    context_rank: int


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; a plain `python` run is 1 process."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return rank, local_rank, world_size


def node_size_from_env() -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE); a plain `python` run is 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` uses this node's GPU for the local rank when there is one, else the CPU; `cuda`
    without a GPU for this local rank is a UserError (torch would fail deep in the first CUDA call)."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(
            f"train.device = cuda but this machine has no usable GPU (torch {torch.__version__}, {built}): "
            "use train.device=cpu or auto"
        )
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"local rank {local_rank} needs GPU {local_rank}, but this node has {torch.cuda.device_count()}: "
            "start at most that many processes per node"
        )
    return torch.device("cuda", local_rank)


def init_process_group(device: torch.device, rank: int, world_size: int) -> None:
    """NCCL on GPU, gloo on CPU. A plain single process gets a private rendezvous."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=30))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(layout: Layout) -> tuple[RankInfo, Any]:
    """Creates megatron-core's process groups for `layout`; returns this rank's coordinates and the
    groups as megatron-core's ProcessGroupCollection (what the model, the step and DDP are given)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor,
        # a2a+p2p: megatron-core builds, for every CP group on every rank in the same order, the
        # all-to-all groups (consecutive CP ranks) and the ring groups across them
        hierarchical_context_parallel_sizes=layout.hierarchical_context,
        # HSDP: megatron-core's partial data-parallel groups are the shard groups (consecutive
        # data × context ranks, groups.intra_dp_cp) and the groups across them (groups.inter_dist_opt)
        num_distributed_optimizer_instances=layout.fsdp_replicas,
    )
    groups = ProcessGroupCollection.use_mpu_process_groups()
    rank = RankInfo(rank=dist.get_rank(), data_rank=groups.dp.rank(), context_rank=groups.cp.rank())
    return rank, groups


def init_single_process() -> Any:
    """One gloo process on the CPU with megatron-core's groups at every size 1 (conversion, the dry
    run's meta-device count, benchmarks); returns the groups. `shutdown()` undoes it."""
    from upstream import cpu

    cpu.enable(torch.device("cpu"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return init_model_parallel(Layout(world_size=1))[1]


def shutdown() -> None:
    """Destroys megatron-core's groups and the process group (tests reuse processes)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

"""The `parallel` recipe section: how many ranks split each axis, and its own checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.errors import RecipeError
from common.schema import PositiveInt


@dataclass
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is what is left of the world size."""

    tensor: PositiveInt = 1  # ranks that split each layer's weights
    pipeline: PositiveInt = 1  # ranks that split the layer stack
    virtual_pipeline: PositiveInt | None = None  # None = no interleaving; else model chunks per pipeline rank
    context: PositiveInt = 1  # ranks that split each sequence
    # How context-parallel attention communicates (ours with the local layers, transformer-engine's
    # otherwise). p2p: K/V travel around a ring; a2a: all-to-all from sequence shards to head shards
    # (Ulysses); a2a+p2p: all-to-all inside groups of context_a2a consecutive context ranks, the ring
    # across the groups; all_gather (of K/V): transformer-engine only.
    context_comm: Literal["p2p", "a2a", "a2a+p2p", "all_gather"] = "p2p"
    context_a2a: PositiveInt | None = None  # ranks per all-to-all group with a2a+p2p (divides context); else null
    expert: PositiveInt = 1  # ranks that split the experts (MoE); carved out of the data-parallel ranks
    expert_tensor: PositiveInt | None = None  # ranks that split each expert's weights; null = parallel.tensor
    sequence_parallel: bool = False  # shard activations along the sequence inside tensor-parallel regions
    distributed_optimizer: bool = False  # shard optimizer state across data-parallel ranks
    # Fully sharded data parallelism (torch FSDP2 through megatron-core; docs/fsdp.md). zero2 shards
    # gradients and optimizer state and keeps each layer's gathered weights from its forward to its
    # backward; zero3 shards the weights too and gathers them again for the backward. null = each
    # data-parallel rank holds the whole (tensor/pipeline-split) model: DDP, or ZeRO-1 with
    # distributed_optimizer.
    fsdp: Literal["zero2", "zero3"] | None = None
    # Hybrid sharding (HSDP) under fsdp: the weights, gradients and optimizer state are sharded
    # within groups of this many consecutive data × context-parallel ranks (with tensor parallelism
    # inside a node, one node's) and replicated across the groups; gradients are reduce-scattered
    # inside a group, then all-reduced across groups. A divisor of data × context; node = the ones
    # on one node (processes per node / tensor; scripts/slurm's default under fsdp); null = one
    # group of all of them (plain FSDP).
    fsdp_shard_size: PositiveInt | Literal["node"] | None = None
    # Communication overlap, megatron-core's; null = on wherever it applies (docs/profiling.md).
    # Reduce gradients (all-reduce, or reduce-scatter with distributed_optimizer) bucket by bucket
    # while the backward still computes the rest.
    overlap_grad_reduce: bool | None = None
    # distributed_optimizer: the next forward all-gathers the updated weights bucket by bucket, each
    # bucket while the layers before it compute, instead of all at once after the optimizer step.
    overlap_param_gather: bool | None = None
    # Parameters per gradient bucket with overlap_grad_reduce (the first pipeline stage; the others
    # reduce in one bucket); null = megatron-core's max(40M, 1M × data-parallel size).
    bucket_size: PositiveInt | None = None
    # Interleaved pipeline (virtual_pipeline > 1): activations are sent and received while the next
    # micro-batch computes.
    overlap_p2p_comm: bool | None = None
    # Tensor-parallel communication overlap (megatron-core's tp_comm_overlap, Megatron-LM's
    # --tp-comm-overlap): transformer-engine's userbuffers split each sequence-parallel all-gather
    # and reduce-scatter into chunks pipelined with the GEMM they feed (parallel/tp_overlap.py).
    # GPUs, transformer_engine layers and sequence_parallel only.
    tp_comm_overlap: bool = False
    # Uneven pipeline split (no virtual pipeline): layers on the first / last stage, e.g. fewer
    # where the embedding or the output layer and loss live; the rest split evenly. None = even.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def check(self) -> None:
        """The section's own consistency; sizes against the model are model/config.py's."""
        if self.sequence_parallel and self.tensor == 1:
            raise RecipeError("parallel.sequence_parallel = true requires parallel.tensor > 1, got parallel.tensor = 1")
        if self.virtual_pipeline is not None and self.virtual_pipeline > 1 and self.pipeline == 1:
            raise RecipeError(
                f"parallel.virtual_pipeline = {self.virtual_pipeline} requires parallel.pipeline > 1, "
                f"got parallel.pipeline = 1"
            )
        if self.fsdp is not None and self.distributed_optimizer:
            raise RecipeError(
                f"parallel.fsdp = {self.fsdp} shards the optimizer state itself: set "
                f"parallel.distributed_optimizer = false"
            )
        if self.fsdp_shard_size is not None and self.fsdp is None:
            raise RecipeError(
                f"parallel.fsdp_shard_size = {self.fsdp_shard_size} is only read with parallel.fsdp (zero2 or "
                f"zero3): set parallel.fsdp, or leave parallel.fsdp_shard_size null"
            )
        if self.tp_comm_overlap and not self.sequence_parallel:
            raise RecipeError(
                "parallel.tp_comm_overlap = true overlaps the sequence-parallel all-gathers and "
                "reduce-scatters: set parallel.sequence_parallel = true (and parallel.tensor > 1)"
            )
        self._check_context_a2a()
        self._check_overlap()

    def _check_overlap(self) -> None:
        if self.fsdp is not None:
            asked = [
                k
                for k in ("overlap_grad_reduce", "overlap_param_gather", "bucket_size")
                if getattr(self, k) is not None
            ]
            if asked:
                raise RecipeError(
                    f"parallel.fsdp = {self.fsdp} overlaps its own all-gathers and reduce-scatters (torch FSDP2 "
                    f"prefetching): leave parallel.{', parallel.'.join(asked)} null"
                )
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise RecipeError(
                "parallel.overlap_param_gather = true needs parallel.distributed_optimizer = true: "
                "without it every data-parallel rank updates whole weights and there is nothing to gather"
            )
        if self.bucket_size is not None and self.overlap_grad_reduce is False:
            raise RecipeError(
                f"parallel.bucket_size = {self.bucket_size} is only read with parallel.overlap_grad_reduce: "
                f"without overlap megatron-core reduces each model chunk's gradients in one bucket"
            )
        if self.overlap_p2p_comm and (self.virtual_pipeline or 1) == 1:
            raise RecipeError(
                "parallel.overlap_p2p_comm = true: megatron-core overlaps pipeline sends and receives in the "
                "interleaved schedule only; set parallel.virtual_pipeline > 1 or leave overlap_p2p_comm null"
            )

    def build_data_parallel(self, chunks: list[Any], groups: Any, fp8_param_gather: bool = False) -> list[Any]:
        """The model chunks wrapped for data parallelism as this section asks: DDP (with the
        distributed optimizer's sharding and the overlaps resolved) or FSDP2 (parallel/data_parallel.py).
        `fp8_param_gather`: transformer-engine's FP8 weights (fp8.params), gathered in FP8."""
        from parallel.data_parallel import wrap_data_parallel

        return wrap_data_parallel(
            chunks,
            self.distributed_optimizer,
            groups,
            fsdp=self.fsdp,
            fp8_param_gather=fp8_param_gather,
            overlap_grad_reduce=self.grad_reduce_overlapped,
            overlap_param_gather=self.param_gather_overlapped,
            bucket_size=self.bucket_size,
        )

    def overlap_description(self) -> str:
        """The overlaps a run gets, as its start-up line and --dry-run say them."""
        if self.fsdp is not None:
            return "torch FSDP2's own (all-gathers prefetched, reduce-scatters during the backward)"
        on = [
            name
            for name, overlapped in (
                ("gradient reduce", self.grad_reduce_overlapped),
                ("parameter all-gather", self.param_gather_overlapped),
                ("pipeline send/receive", self.p2p_overlapped),
                ("tensor-parallel all-gather/reduce-scatter (userbuffers)", self.tp_comm_overlap),
            )
            if overlapped
        ]
        return ", ".join(on) or "none"

    @property
    def grad_reduce_overlapped(self) -> bool:
        """overlap_grad_reduce resolved: DDP and the distributed optimizer, unless switched off."""
        return self.fsdp is None and self.overlap_grad_reduce is not False

    @property
    def param_gather_overlapped(self) -> bool:
        """overlap_param_gather resolved: with the distributed optimizer, unless switched off."""
        return self.distributed_optimizer and self.overlap_param_gather is not False

    @property
    def p2p_overlapped(self) -> bool:
        """overlap_p2p_comm resolved: with an interleaved pipeline, unless switched off."""
        return (self.virtual_pipeline or 1) > 1 and self.overlap_p2p_comm is not False

    def _check_context_a2a(self) -> None:
        a2a, cp = self.context_a2a, self.context
        if self.context_comm != "a2a+p2p":
            if a2a is not None:
                raise RecipeError(
                    f"parallel.context_a2a = {a2a} is only read with parallel.context_comm = a2a+p2p, "
                    f"got parallel.context_comm = {self.context_comm}"
                )
            return
        if a2a is None:
            raise RecipeError(
                f"parallel.context_comm = a2a+p2p needs parallel.context_a2a: the ranks of one all-to-all "
                f"group, a divisor of parallel.context = {cp}"
            )
        if cp % a2a:
            raise RecipeError(f"parallel.context_a2a = {a2a} does not divide parallel.context = {cp}")
        if a2a == 1 or a2a == cp:
            same = "p2p" if a2a == 1 else "a2a"
            raise RecipeError(
                f"parallel.context_a2a = {a2a} with parallel.context = {cp} leaves "
                f"{'an all-to-all' if a2a == 1 else 'a ring'} of one rank: set parallel.context_comm = {same}"
            )


def check_sharding(parallel: ParallelConfig, experts: int | None, transformer_impl: str) -> None:
    """parallel.fsdp and fsdp_shard_size against the model (model/config.py check_model): FSDP on the
    local layers, hybrid sharding for dense models only."""
    if parallel.fsdp is not None and transformer_impl != "local":
        # Each upstream fix under FSDP (upstream/fsdp.py) was verified on the local layers only.
        raise RecipeError(
            f"parallel.fsdp = {parallel.fsdp} is verified with model.transformer_impl = local only "
            f"(got {transformer_impl}): transformer-engine layers under FSDP2 are not yet checked"
        )
    if parallel.fsdp_shard_size is not None and experts is not None:
        raise RecipeError(
            f"parallel.fsdp_shard_size = {parallel.fsdp_shard_size} with model.moe is not built yet (experts are "
            "sharded over their own expert-data-parallel group, which hybrid sharding does not split): leave it null"
        )


def pipeline_stage_layers(parallel: ParallelConfig, num_layers: int) -> list[int]:
    """Layers held by each pipeline rank (all its virtual chunks together)."""
    first, last, pp = parallel.first_stage_layers, parallel.last_stage_layers, parallel.pipeline
    if first is None and last is None:
        return [num_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    per_middle = middle // middle_stages if middle_stages else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def check_uneven_pipeline(p: ParallelConfig, layers: int) -> None:
    """first_stage_layers / last_stage_layers against the model's layer count (model/config.py)."""
    keys = [k for k in ("first_stage_layers", "last_stage_layers") if getattr(p, k) is not None]
    named = " and ".join(f"parallel.{k}" for k in keys)
    if p.pipeline < 2:
        raise RecipeError(f"{named} requires parallel.pipeline > 1, got parallel.pipeline = {p.pipeline}")
    if p.virtual_pipeline is not None:
        raise RecipeError(f"{named} cannot be combined with parallel.virtual_pipeline")
    for key in keys:
        if getattr(p, key) < 1:
            raise RecipeError(f"parallel.{key} must be positive, got {getattr(p, key)}")
    middle_stages = p.pipeline - len(keys)
    middle = layers - sum(getattr(p, k) for k in keys)
    if middle < middle_stages or (middle_stages == 0 and middle != 0) or (middle_stages and middle % middle_stages):
        raise RecipeError(
            f"{named} leave {middle} of model.num_layers = {layers} for {middle_stages} other pipeline "
            f"stage(s): they must split evenly, at least one layer each"
        )

"""Per-rank memory of a training step, predicted from the recipe (docs/memory.md): weights,
gradients, optimizer state, the activations of the micro-batches a pipeline schedule holds at once,
logits and loss buffers, communication buffers; the peak, the worst rank, and whether it fits."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from model.config import ModelConfig, head_dim, moe_layer_pattern
from model.gpt import layer_parameters, padded_vocab_size
from parallel.layout import Layout
from planning import activations as act
from planning.activations import FP32, Kernels, Shape
from planning.mtp import mtp_items, mtp_stage_parameters
from planning.muon_memory import adam_parameters, muon_temporaries
from planning.schedule import in_flight, overlap_held
from planning.setup import stage_layers, validate_for_world, vocab_size
from planning.te_memory import fp8_weight_bytes, userbuffer_bytes

if TYPE_CHECKING:
    from pretrain.recipe import Recipe

GIB, MIB = 2**30, 2**20
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the step runs, for the terms that depend on it (docs/memory.md, "Device assumptions")."""

    kernels: Kernels = Kernels()
    fused_adam: bool = True  # transformer-engine / apex Adam: no temporaries in the optimizer step
    gloo: bool = False  # gloo's reduce-scatter works on a full-size copy of the gradient buffer

    @classmethod
    def for_device(cls, device: str, transformer_impl: str) -> Target:
        te = transformer_impl == "transformer_engine"
        if device == "cpu":
            return cls(Kernels("cpu", False), fused_adam=False, gloo=True)
        return cls(Kernels("cuda", te), fused_adam=te)


@dataclasses.dataclass(frozen=True)
class Shards:
    """The data-parallel factor that divides each per-parameter state (1 = every rank holds it all)."""

    weights: int
    grads: int
    optimizer: int


def state_shards(layout: Layout, distributed_optimizer: bool) -> dict[str, Shards]:
    """How dense and expert parameters' weights, gradients and optimizer state split over the
    data-parallel ranks. The distributed optimizer shards its state over the data × context ranks
    (expert parameters: the expert-data-parallel ranks); gradient buffers and weights stay whole.
    FSDP (zero2, zero3) shards all three over the same ranks."""
    dense = layout.data * layout.context
    expert = layout.world_size // (layout.pipeline * layout.expert * (layout.expert_tensor or layout.tensor))
    if layout.fsdp is not None:
        dense = layout.fsdp_shards  # HSDP: the shard group's ranks (parallel.fsdp_shard_size)
        return {"dense": Shards(dense, dense, dense), "expert": Shards(expert, expert, expert)}
    opt = (lambda dp: dp) if distributed_optimizer else (lambda dp: 1)
    return {"dense": Shards(1, 1, opt(dense)), "expert": Shards(1, 1, opt(expert))}


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Bytes on each rank of one pipeline stage (its tensor/context/data/expert ranks are alike)."""

    pipeline_rank: int
    ranks: range  # global ranks of this stage (megatron-core's order puts the pipeline axis outermost)
    weights: int
    grads: int
    optimizer: int
    comm_buffers: int  # persistent: the sequence-parallel all-gather buffer, TE's userbuffers
    gathered: int  # FSDP: weights gathered in the compute dtype while the forward/backward runs
    activations: int  # kept for the backward by the micro-batches in flight at the worst moment
    logits: int  # the last stage's logits/loss buffers of the micro-batches in flight (in activations too)
    transient: int  # the largest short-lived allocation on top (a backward's gradients, a recompute)
    optimizer_transient: int  # the optimizer step's temporaries (no activations are live then)
    in_flight: int  # (chunk) micro-batches whose activations are held at the worst moment
    userbuffers: int = 0  # the part of comm_buffers TE allocates outside torch's allocator (tp_comm_overlap)

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer + self.comm_buffers

    @property
    def peak(self) -> int:
        return self.static + max(self.gathered + self.activations + self.transient, self.optimizer_transient)

    def terms(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "comm_buffers": self.comm_buffers,
            "gathered": self.gathered,
            "activations": self.activations,
            "logits": self.logits,
            "transient": self.transient,
            "optimizer_transient": self.optimizer_transient,
            "peak": self.peak,
        }


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every term is computed from, resolved once per estimate."""

    recipe: Recipe
    layout: Layout
    target: Target
    vocab: int  # padded
    micro_batches: int  # per optimizer step on one data-parallel rank
    stage_ranges: list[tuple[tuple[int, int], ...]]  # global layer ranges of each stage's chunks

    @property
    def model(self) -> ModelConfig:
        return self.recipe.model

    @property
    def shape(self) -> Shape:
        return micro_batch_shape(self.recipe, self.layout)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    world_size: int
    stages: list[StageMemory]

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)


# ------------------------------------------------------------------------------------- static state


def stage_parameters(setup: Setup, pipeline_rank: int) -> tuple[int, int]:
    """(dense, expert) parameters on one rank of a pipeline stage."""
    m, layout, vocab = setup.model, setup.layout, setup.vocab
    pattern = moe_layer_pattern(m)
    local = m.moe.num_experts // layout.expert if m.moe.num_experts else None
    tp, etp = layout.tensor, layout.expert_tensor or layout.tensor
    moe_layers = sum(sum(pattern[a:b]) for a, b in setup.stage_ranges[pipeline_rank])
    dense_layers = sum(b - a for a, b in setup.stage_ranges[pipeline_rank]) - moe_layers
    # every layer of a kind has the same parameters: count each kind once (the planner calls this a lot)
    dense = dense_layers * layer_parameters(m, False, tensor=tp, expert_tensor=etp, experts=0) if dense_layers else 0
    expert = 0
    if moe_layers:
        without = layer_parameters(m, True, tensor=tp, expert_tensor=etp, experts=0)
        dense += moe_layers * without
        expert = moe_layers * (layer_parameters(m, True, tensor=tp, expert_tensor=etp, experts=local) - without)
    if pipeline_rank == 0:
        dense += vocab * m.hidden_size // tp
    if pipeline_rank == layout.pipeline - 1:
        dense += m.hidden_size + (vocab * m.hidden_size // tp if m.untie_embeddings or layout.pipeline > 1 else 0)
        mtp = mtp_stage_parameters(m, vocab, layout.pipeline, tp, etp, local)
        dense, expert = dense + mtp[0], expert + mtp[1]
    return dense, expert


def _buffer_numel(params: int, dp: int, distributed: bool) -> int:
    """Gradient-buffer elements: the distributed optimizer pads each buffer to lcm(dp, 128)."""
    if not distributed or params == 0:
        return params
    multiple = math.lcm(dp, 128)
    return -(-params // multiple) * multiple


def static_state(setup: Setup, pipeline_rank: int) -> tuple[int, int, int, int]:
    """(weights, gradients, optimizer state, optimizer-step temporaries) of one rank of a stage."""
    recipe, layout, target = setup.recipe, setup.layout, setup.target
    precision, distributed = recipe.train.precision, recipe.parallel.distributed_optimizer
    fsdp = layout.fsdp is not None
    # FSDP's parameters are the fp32 master weights, in bf16 too (gathered as bf16 only to compute)
    b = FP32 if fsdp else _BYTES[precision]
    shards = state_shards(layout, distributed)
    weights = grads = optimizer = temporaries = 0
    muon = recipe.optimizer.name == "muon"
    adam = {"dense": adam_parameters(setup, pipeline_rank), "expert": 0}
    for kind, params in zip(("dense", "expert"), stage_parameters(setup, pipeline_rank)):
        s = shards[kind]
        numel = _buffer_numel(params, s.optimizer, distributed)
        weights += numel * b // s.weights
        grads += numel * FP32 // s.grads  # megatron-core DDP and FSDP reduce gradients in fp32
        # Adam's two moments (Muon's matrices: one momentum), plus fp32 master weights when the
        # weights are not fp32
        moments = 2 * numel - (params - adam[kind] if muon else 0)
        if recipe.optimizer.cpu_offload:  # these moments on the host (planning/offload.py)
            moments -= int(moments * recipe.optimizer.offload_fraction)
        optimizer += (moments * FP32 + (numel * FP32 if b != FP32 else 0)) // s.optimizer
        if not target.fused_adam:
            # torch's Adam: on a GPU the foreach path takes one moment-sized temporary for the whole
            # group; on the CPU the per-parameter path, one parameter at a time
            temporaries += numel * FP32 // s.optimizer if target.kernels.device == "cuda" else 0
        if target.gloo and distributed and params:
            temporaries = max(temporaries, numel * FP32)  # gloo reduce-scatters through a full copy
    if not target.fused_adam and target.kernels.device == "cpu":
        shard = shards["dense"].weights
        temporaries = max(temporaries, 2 * FP32 * _largest_parameter(setup) // shard)
    if muon:
        temporaries = max(temporaries, muon_temporaries(setup, pipeline_rank, shards["expert"].optimizer))
    return weights + fp8_weight_bytes(setup, pipeline_rank), grads, optimizer, temporaries


def gathered_weights(setup: Setup, pipeline_rank: int) -> int:
    """FSDP: bytes of gathered (unsharded) weights in the compute dtype while the forward and
    backward run. The root unit (final norm, output layer, a tied embedding) stays gathered from its
    forward to its backward; zero2 keeps every unit (each layer, an untied embedding) gathered too;
    zero3 frees a layer after its forward and backward, so at most the running one and the next one
    (prefetched) are gathered at once. Measured on the CPU: docs/memory.md."""
    layout, m = setup.layout, setup.model
    if layout.fsdp is None:
        return 0
    b, tp = _BYTES[setup.recipe.train.precision], layout.tensor
    pattern = moe_layer_pattern(m)
    local = m.moe.num_experts // layout.expert if m.moe.num_experts else None
    etp = layout.expert_tensor or tp
    layers = [
        layer_parameters(m, pattern[i], tensor=tp, expert_tensor=etp, experts=local)
        for a, z in setup.stage_ranges[pipeline_rank]
        for i in range(a, z)
    ]
    tied = not m.untie_embeddings
    root = embedding = 0
    if pipeline_rank == 0:
        embedding = setup.vocab * m.hidden_size // tp
    if pipeline_rank == layout.pipeline - 1:
        root += m.hidden_size + (setup.vocab * m.hidden_size // tp if m.untie_embeddings or layout.pipeline > 1 else 0)
    if tied:  # the embedding is in the root unit (parallel/data_parallel.py:wrap_fully_sharded)
        root, embedding = root + embedding, 0
    if layout.fsdp == "zero2":
        return (root + embedding + sum(layers)) * b
    return (root + sum(sorted(layers)[-2:])) * b


def _largest_parameter(setup: Setup) -> int:
    m, tp = setup.model, setup.layout.tensor
    ffn = max(m.ffn_hidden_size, m.moe.ffn_hidden_size or 0)
    return max(setup.vocab // tp, 2 * ffn // tp) * m.hidden_size


# ------------------------------------------------------------------------------------- activations


def micro_batch_shape(recipe: Recipe, layout: Layout) -> Shape:
    return Shape(
        micro_batch=recipe.train.micro_batch_size,
        seq=recipe.model.seq_length // layout.context,
        tensor=layout.tensor,
        sequence_parallel=layout.sequence_parallel,
        dtype_bytes=_BYTES[recipe.train.precision],
        expert=layout.expert,
        expert_tensor=layout.expert_tensor or layout.tensor,
        ulysses={"a2a": layout.context, "a2a+p2p": layout.context_a2a or 1}.get(layout.context_comm, 1),
    )


@dataclasses.dataclass(frozen=True)
class ChunkBytes:
    kept: int  # per micro-batch, held until its backward
    logits: int  # the part of `kept` that is the logits/loss buffers
    backward_peak: int  # the most of its own bytes live at once from the loss to the end of its backward


def chunk_bytes(setup: Setup, layers: tuple[int, int], first: bool, last: bool) -> ChunkBytes:
    """One model chunk's activations per micro-batch (layers [a, b), the embedding when `first`, the
    output layer and loss when `last`) under the recipe's recompute."""
    m, shape, kernels = setup.model, setup.shape, setup.target.kernels
    hidden = shape.sharded_tokens * m.hidden_size * shape.dtype_bytes
    items: list[tuple[int, int]] = []  # (kept, transient while its backward runs), forward order
    if first:
        items.append((shape.tokens * 8, 0))  # token ids, for the embedding's backward
    elif kernels.device == "cpu" and shape.dtype_bytes != FP32:
        items.append((hidden, 0))  # the received input: the schedule keeps it, the CPU norm an fp32 copy
    items += layer_items(setup, layers)
    logits = 0
    if last:
        logits, loss_transient = act.logits_and_loss(m, setup.vocab, shape, kernels)
        items.append((logits, loss_transient))
        items += mtp_items(m, setup.vocab, shape, kernels, setup.target.gloo)
    # Any other chunk's output is freed once sent (deallocate_pipeline_outputs, model/gpt.py): only its
    # autograd graph stays, so it holds no bytes here.
    return ChunkBytes(sum(k for k, _ in items), logits, backward_peak(items))


def backward_peak(items: list[tuple[int, int]]) -> int:
    """The backward runs through the items in reverse, freeing each one's bytes when done: while
    item i's backward runs, items 0..i are live plus its transient."""
    live = peak = 0
    prefix = []
    for kept, _ in items:
        live += kept
        prefix.append(live)
    for (_, transient), live in zip(items, prefix):
        peak = max(peak, live + transient)
    return peak


def layer_items(setup: Setup, layers: tuple[int, int]) -> list[tuple[int, int]]:
    """(kept, backward transient) per layer, or per group of layers one checkpoint recomputes."""
    m, shape, target = setup.model, setup.shape, setup.target
    pattern = moe_layer_pattern(m)
    fp8 = setup.recipe.fp8
    kernels = [dataclasses.replace(target.kernels, fp8=act.fp8_layer(fp8, m.num_layers, i)) for i in range(*layers)]
    parts = [(act.moe_layer if pattern[i] else act.dense_layer)(m, shape, k) for i, k in zip(range(*layers), kernels)]
    full = [act.layer_saved(p) for p in parts]
    grads = [act.backward_transient(m, shape, pattern[i], target.gloo) for i in range(*layers)]
    hidden = shape.sharded_tokens * m.hidden_size * shape.dtype_bytes  # a checkpoint's input
    if m.recompute_granularity == "selective":
        modules = list(m.recompute_modules or ["core_attn"])
        return [
            (act.recompute_saved(p, modules, shape, m), act.recompute_transient(p, modules) + g)
            for p, g in zip(parts, grads)
        ]
    if m.recompute_granularity == "full":
        n = m.recompute_num_layers or 1
        # the checkpoints also keep the rotary frequencies [s, 1, 1, head_dim] (fp32), one tensor for all
        rope = [(shape.seq * head_dim(m) * FP32, 0)]
        if m.recompute_method == "uniform":  # a group keeps only its input and reruns all its layers at once
            return rope + [(hidden, sum(full[i : i + n]) + max(grads[i : i + n])) for i in range(0, len(full), n)]
        return rope + [(hidden, f + g) if i < n else (f, g) for i, (f, g) in enumerate(zip(full, grads))]
    return list(zip(full, grads))


def stage_activations(setup: Setup, pipeline_rank: int) -> tuple[int, int, int, int]:
    """(kept, logits, transient, in-flight count) at the stage's worst moment: the activations of
    the micro-batches in flight, with the one whose backward runs at its own backward peak."""
    layout = setup.layout
    ranges = setup.stage_ranges[pipeline_rank]
    last_rank = pipeline_rank == layout.pipeline - 1
    chunks = [
        chunk_bytes(setup, r, pipeline_rank == 0 and c == 0, last_rank and c == len(ranges) - 1)
        for c, r in enumerate(ranges)
    ]

    schedule = (layout.pipeline, len(ranges), pipeline_rank, setup.micro_batches)
    p2p = overlap_held(*schedule, overlapped=setup.recipe.parallel.p2p_overlapped)  # pipeline tensors more
    hidden = setup.shape.sharded_tokens * setup.model.hidden_size * setup.shape.dtype_bytes

    def peak(moment: tuple[tuple[list[int], int | None], int]) -> int:
        (live, backward), extra = moment
        held = sum(chunks[c].kept for c in live) + extra * hidden
        return held if backward is None else held - chunks[backward].kept + chunks[backward].backward_peak

    worst = max(zip(in_flight(*schedule), p2p), key=peak)
    live = worst[0][0]
    kept = sum(chunks[c].kept for c in live)
    logits = sum(chunks[c].logits for c in live)
    return kept, logits, peak(worst) - kept, len(live)


# ------------------------------------------------------------------------------------------ estimate


def setup_for(
    recipe: Recipe,
    world_size: int,
    target: Target | None = None,
    vocab: int | None = None,
    node_size: int | None = None,
) -> Setup:
    """The layout and batch plan for `world_size` ranks, `node_size` per node (validated as the run
    would be), the padded vocabulary (`vocab`: the unpadded size, else read from the recipe or its
    tokenizer)."""
    layout, batch = validate_for_world(recipe, world_size, node_size)
    target = target or Target.for_device("cuda", recipe.model.transformer_impl)
    padded = padded_vocab_size(recipe.model, vocab or vocab_size(recipe), layout.tensor)
    return Setup(recipe, layout, target, padded, batch.micro_batches, stage_layers(recipe, layout))


def estimate(recipe: Recipe, world_size: int, target: Target | None = None, vocab: int | None = None) -> MemoryEstimate:
    """Every pipeline stage's memory for `world_size` ranks."""
    return estimate_setup(setup_for(recipe, world_size, target, vocab))


def sequence_parallel_buffer(setup: Setup, pipeline_rank: int) -> int:
    """The all-gather buffer megatron-core keeps once its own sequence-parallel linears used it
    (get_global_memory_buffer, tensor_parallel/layers.py:482). Transformer-engine's dense layers
    gather into their own tensors (or TE's userbuffers), so on that path only a stage with the
    output layer (a megatron-core ColumnParallelLinear) or MoE layers (the all-gather dispatcher's
    global buffer) holds it."""
    layout, shape, m = setup.layout, setup.shape, setup.model
    if not layout.sequence_parallel:
        return 0
    moe = any(moe_layer_pattern(m)[i] for a, z in setup.stage_ranges[pipeline_rank] for i in range(a, z))
    if setup.target.kernels.transformer_engine and pipeline_rank < layout.pipeline - 1 and not moe:
        return 0
    return shape.tokens * m.hidden_size * shape.dtype_bytes


def estimate_setup(setup: Setup) -> MemoryEstimate:
    layout = setup.layout
    per_stage = layout.world_size // layout.pipeline
    userbuffers = userbuffer_bytes(setup)  # parallel.tp_comm_overlap's, transformer-engine layers only
    stages = []
    for p in range(layout.pipeline):
        weights, grads, optimizer, opt_temp = static_state(setup, p)
        kept, logits, transient, count = stage_activations(setup, p)
        gathered = gathered_weights(setup, p)
        stages.append(
            StageMemory(
                pipeline_rank=p,
                ranks=range(p * per_stage, (p + 1) * per_stage),
                weights=weights,
                grads=grads,
                optimizer=optimizer,
                comm_buffers=sequence_parallel_buffer(setup, p) + userbuffers,
                gathered=gathered,
                activations=kept,
                logits=logits,
                transient=transient,
                optimizer_transient=opt_temp,
                in_flight=count,
                userbuffers=userbuffers,
            )
        )
    return MemoryEstimate(layout.world_size, stages)

"""An analytic step time for a recipe and layout on a GPU cluster (docs/memory.md, "The planner"):
compute at an assumed fraction of the GPU's peak, tensor/context/expert/data/pipeline communication at
stated NVLink and InfiniBand bandwidths, the pipeline bubble, and recompute's extra forward."""

from __future__ import annotations

import dataclasses
import math

from model.config import head_dim
from model.moe_config import moe_layer_pattern
from planning.activations import fp8_layer
from planning.data_parallel_time import data_parallel_exposed, data_parallel_seconds, hsdp_replica_seconds
from planning.flops import attention_gemms, attention_widths, layer_totals, model_forward_flops, recompute_forward_flops
from planning.gpus import Gpu
from planning.memory import Setup, stage_parameters
from planning.mtp import mtp_is_moe
from planning.offload import offload_seconds

# Bytes per token per layer of elementwise work in the forward and backward together (norms, rotary,
# residual adds, SwiGLU, their gradients), in units of one [hidden] / one [ffn] activation of
# dtype_bytes: memory-bound, so it runs at HBM bandwidth, not the tensor cores' rate. Counted from
# megatron-core's TE layer (docs/planner.md, "Elementwise work"): an assumption, not a measurement.
ELEMENTWISE_HIDDEN_PASSES = 30
ELEMENTWISE_FFN_PASSES = 9
# A GEMM's output is computed in tiles of TILE rows x columns, one per SM at a time; the last wave of
# tiles leaves SMs idle (NVIDIA's Deep Learning Performance Guide, "Matrix Multiplication Background",
# wave quantization). 128 x 256 is cuBLAS/CUTLASS's usual Hopper bf16 tile (an assumption per shape).
TILE = (128, 256)
# the shape behind each GPU's measured matmul_efficiency (mamf-finder's best, 6144 x 17920 x 2816)
MAMF_SHAPE = (6144, 17920)
# SMs a transformer-engine userbuffers overlap of the `pipeline` and `bulk` methods communicates
# from (module/base.py, initialize_ub: num_sm defaults to 16 unless the method is ring_exchange)
UB_SMS = 16


FLOPS_CONVENTION = (
    "model FLOPs: 3 x forward (6 per parameter-token of every linear and the output layer, "
    "causal attention counted half: 6·s·h per layer-token; the output layer over the padded "
    "vocabulary), no recompute"
)


@dataclasses.dataclass(frozen=True)
class Term:
    """One part of the step: `seconds` of work, of which `exposed` adds to the step time."""

    name: str
    seconds: float
    exposed: float


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute: float  # seconds of matmul, attention and elementwise work on the busiest stage, bubble included
    tensor: float  # each communication term: its exposed seconds
    context: float
    expert: float
    data: float
    pipeline: float
    model_flops: float  # the step's useful FLOPs over all GPUs (no recompute), for MFU
    # Muon's Newton-Schulz on the stage's whole matrices and the gathers that rebuild them
    # (optimizer.name = muon; 0 for AdamW, whose step the planner leaves out), plus with
    # optimizer.cpu_offload the host copies and the host AdamW step (planning/offload.py)
    optimizer: float = 0.0
    terms: tuple[Term, ...] = ()  # every part with its work and exposed seconds (--dry-run --json)

    @property
    def total(self) -> float:
        return self.compute + self.tensor + self.context + self.expert + self.data + self.pipeline + self.optimizer

    def mfu(self, gpu: Gpu, precision: str, gpus: int) -> float:
        return self.model_flops / (self.total * gpus * gpu.peak(precision))

    def as_json(self, tokens_per_step: int, gpus: int, gpu: Gpu) -> dict:
        """--dry-run --gpu --json's step_time: seconds, throughput per GPU, and every term."""
        return {
            "gpu": gpu.name,
            "seconds": self.total,
            "tokens_per_s_per_gpu": tokens_per_step / self.total / gpus,
            "tflops_per_gpu": self.model_flops / self.total / gpus / 1e12,
            "flops_convention": FLOPS_CONVENTION,
            "terms": {t.name: {"seconds": t.seconds, "exposed": t.exposed} for t in self.terms},
        }


def _gemm_seconds(gpu: Gpu, m: float, k: float, n: float, peak: float, b: float) -> float:
    """A roofline: [m, k] x [k, n] at the achievable matmul rate, or reading and writing its operands
    at HBM bandwidth, whichever is slower (small GEMMs, e.g. one expert's few tokens, are memory-bound).
    `b` = 1: an fp8 GEMM, at the fp8 peak `peak` and its own achievable fraction."""
    efficiency = gpu.fp8_matmul_efficiency if b == 1 else gpu.matmul_efficiency
    efficiency *= _wave_efficiency(gpu, m, n) / _wave_efficiency(gpu, *MAMF_SHAPE)
    return max(2.0 * m * k * n / (peak * efficiency), (m * k + k * n + m * n) * b / (gpu.hbm_gbs * 1e9))


def _wave_efficiency(gpu: Gpu, m: float, n: float) -> float:
    """The busy fraction of the SMs over a GEMM's waves of output tiles (partial tiles count whole)."""
    tiles = math.ceil(m / TILE[0]) * math.ceil(n / TILE[1])
    return tiles / (math.ceil(tiles / gpu.sms) * gpu.sms)


def _layer_seconds(setup: Setup, gpu: Gpu, is_moe: bool, fp8: bool) -> float:
    """Forward seconds of one layer and micro-batch on one rank (the backward counts twice this)."""
    m, shape = setup.model, setup.shape
    tp, b = shape.tensor, shape.dtype_bytes
    tokens = shape.tokens
    peak = gpu.fp8_peak() if fp8 else gpu.peak(setup.recipe.train.precision)
    gemm_b = 1 if fp8 else b
    h, heads = m.hidden_size, m.num_attention_heads
    q = heads * head_dim(m)  # = h unless model.head_dim says otherwise
    kv = (m.num_query_groups or heads) * head_dim(m)
    gemms = attention_gemms(m)  # column-parallel but the last (the output projection, row-parallel)
    linears = sum(
        _gemm_seconds(
            gpu,
            tokens,
            k / tp if split and i == len(gemms) - 1 else k,
            n / tp if split and i < len(gemms) - 1 else n,
            peak,
            gemm_b,
        )
        for i, (k, n, split) in enumerate(gemms)
    )
    attention = m.seq_length * sum(attention_widths(m)) * tokens / tp / (gpu.peak("bf16") * gpu.attention_efficiency)
    if not is_moe:
        ffn = m.ffn_hidden_size
        linears += 3 * _gemm_seconds(gpu, tokens, h, ffn / tp, peak, gemm_b)
    else:
        moe = m.moe
        assert moe.num_experts is not None
        ffn = moe.ffn_hidden_size or m.ffn_hidden_size
        etp = setup.layout.expert_tensor or tp
        local = moe.num_experts // setup.layout.expert
        # the router's top-k copies of this rank's tokens, spread evenly over the experts (dropless, balanced)
        routed = shape.sharded_tokens * moe.top_k * setup.layout.expert * tp / etp / moe.num_experts
        linears += local * 3 * _gemm_seconds(gpu, routed, h, ffn / etp, peak, gemm_b)
        linears += _gemm_seconds(gpu, tokens, h, moe.num_experts, gpu.peak("bf16"), b)
        if moe.shared_expert_ffn_hidden_size:
            linears += 3 * _gemm_seconds(gpu, tokens, h, moe.shared_expert_ffn_hidden_size / tp, peak, gemm_b)
    elementwise = (
        (shape.sharded_tokens * ELEMENTWISE_HIDDEN_PASSES * h + tokens * ELEMENTWISE_FFN_PASSES * ffn / tp)
        * b
        / (gpu.hbm_gbs * 1e9)
    )
    if fp8:
        # current scaling: each linear's input (forward) and output gradient (backward) is read for its
        # amax, read again and written as fp8 and as its fp8 transpose: 2 reads + 2 one-byte writes
        widths = shape.sharded_tokens * 2 * h + tokens * (q + (q + 2 * kv) + 2 * ffn + ffn) / tp + tokens * h / tp
        elementwise += widths * (2 * b + 2) / (gpu.hbm_gbs * 1e9)
    # forward = a third of the GEMMs and attention; the elementwise passes count forward and backward
    return linears + attention + elementwise / 3


def step_time(setup: Setup, gpu: Gpu) -> StepTime:
    """Seconds per optimizer step on the busiest pipeline stage: a roofline per GEMM (fp8 peaks for fp8 linears), fused
    attention's rate, elementwise work at HBM bandwidth; the (interleaved) 1F1B bubble; recompute's forward; exposed:
    TP collectives (but bulk-overlapped ones; chunked beside GEMMs with parallel.tp_comm_overlap), expert all-to-all,
    HSDP's all-reduce across groups, cpu_offload's copies and host step; hidden: data-parallel traffic under
    parallel.overlap_*, pipeline sends with overlap_p2p_comm, the context ring's K/V under attention."""
    m, layout, shape, recipe = setup.model, setup.layout, setup.shape, setup.recipe
    tp, cp, pp = layout.tensor, layout.context, layout.pipeline
    b = shape.dtype_bytes
    pattern = moe_layer_pattern(m)
    tokens = shape.tokens  # per micro-batch on one rank's sequence shard
    mb, chunks = setup.micro_batches, layout.model_chunks
    if recipe.fp8.enabled:
        gpu.fp8_peak()  # refuses a GPU without FP8 tensor cores before any term is scored
    in_fp8 = [fp8_layer(recipe.fp8, m.num_layers, i) for i in range(m.num_layers)]
    layer_kinds = set(zip(pattern, in_fp8)) | set(_mtp_kinds(setup))
    kinds = {kind: _layer_seconds(setup, gpu, *kind) for kind in layer_kinds}  # (moe, fp8) once each
    # TP with SP: per layer 10 all-gathers/reduce-scatters of [s·b, h], (t-1)/t on the wire; 4 (the QKV's
    # and fc1's backward) hide behind their data/weight-gradient GEMMs (megatron-core's and TE's linears),
    # the other 6 are exposed unless parallel.tp_comm_overlap chunks them (tp_overlap_exposed).
    hidden_bytes = tokens * m.hidden_size * b
    collective = hidden_bytes * (tp - 1) / tp / gpu.bandwidth(tp) if tp > 1 else 0.0
    chunked_kinds = {kind: tp_overlap_exposed(setup, gpu, collective, *kind) for kind in kinds}
    # the busiest stage (uneven splits: the first and last stages differ)
    stages = [_stage_times(setup, gpu, kinds, chunked_kinds, stage) for stage in range(pp)]
    forward, layer_forward, n_layers, moe_layers, chunked = max(stages, key=lambda s: s[0])
    recompute_fraction = recompute_forward_flops(m, pp * chunks) / max(sum(layer_totals(m)), 1.0)
    recompute_mb = recompute_fraction * layer_forward
    micro_batch = 3 * forward + recompute_mb
    work, recompute = 3 * forward * mb, recompute_mb * mb
    tensor_work = 10 * collective * n_layers * mb
    bulk = 4 * collective - min(4 * collective, layer_forward / max(n_layers, 1))
    tensor = (bulk * n_layers + chunked) * mb
    # CP ring: K and V (forward), K, V, dK, dV (backward) around cp - 1 hops; hidden behind attention
    kv = (m.num_query_groups or m.num_attention_heads) * head_dim(m)
    ring = 3 * 2 * tokens * kv // tp * b * (cp - 1) / gpu.bandwidth(tp * cp)
    q = m.num_attention_heads * head_dim(m)
    attention = 3 * 2.0 * m.seq_length * q * tokens / tp / (gpu.peak("bf16") * gpu.attention_efficiency)
    context_work = ring * n_layers * mb if cp > 1 else 0.0
    context = max(ring - attention, 0.0) * n_layers * mb if cp > 1 else 0.0
    expert = _expert_seconds(setup, gpu) * moe_layers * mb
    # 1F1B: (pp - 1)/vpp micro-batches idle, each with its exposed tensor, context, expert collectives
    bubble = (micro_batch + (tensor + context + expert) / mb) * (pp - 1) / chunks
    params = max(sum(stage_parameters(setup, p)) for p in range(pp))  # before any data-parallel sharding
    reduce_scatter, all_gather = data_parallel_seconds(setup, gpu, params)
    rs_exposed, ag_exposed = data_parallel_exposed(setup, params, reduce_scatter, all_gather, micro_batch, forward)
    # pipeline: each micro-batch crosses each chunk boundary forward and backward
    p2p = 2 * hidden_bytes / tp / gpu.bandwidth(gpu.gpus_per_node + 1) * mb * chunks if pp > 1 else 0.0
    pipeline = 0.0 if recipe.parallel.p2p_overlapped else p2p
    tokens_per_step = recipe.train.global_batch_size * m.seq_length
    model_flops = 3 * model_forward_flops(m, setup.vocab) * tokens_per_step
    optimizer = muon_time(setup, gpu) if recipe.optimizer.name == "muon" else 0.0
    replicas, offload = hsdp_and_offload_terms(setup, gpu, params)
    terms = (
        Term("compute", work, work),
        Term("recompute", recompute, recompute),
        Term("bubble", bubble, bubble),
        Term("tensor", tensor_work, tensor),
        Term("context", context_work, context),
        Term("expert", expert, expert),
        Term("data_reduce_scatter", reduce_scatter, rs_exposed),
        Term("data_all_gather", all_gather, ag_exposed),
        Term("pipeline", p2p, pipeline),
        Term("optimizer", optimizer, optimizer),
        replicas,
        offload,
    )
    compute, optimizer = work + recompute + bubble, optimizer + offload.exposed
    data = rs_exposed + ag_exposed + replicas.exposed
    return StepTime(compute, tensor, context, expert, data, pipeline, model_flops, optimizer, terms)


def _mtp_kinds(setup: Setup) -> list[tuple[bool, bool]]:
    """(moe, fp8) of each multi-token prediction module's layer: MoE where layer num_layers would be,
    FP8 as the model's last layer is (an assumption)."""
    m, fp8 = setup.model, setup.recipe.fp8
    return [(mtp_is_moe(m), fp8_layer(fp8, m.num_layers, m.num_layers - 1))] * m.mtp_num_layers


def _stage_times(
    setup: Setup, gpu: Gpu, kinds: dict[tuple[bool, bool], float], chunked: dict[tuple[bool, bool], float], stage: int
) -> tuple[float, float, int, int, float]:
    """(forward, its layers' forward, layers, MoE layers, exposed chunked TP collectives) of one
    micro-batch on a pipeline stage; `kinds`/`chunked` per (moe, fp8) layer kind. The last stage adds
    the output layer and its loss, and each multi-token prediction module (model/mtp.py): its
    [2h -> h] projection, its layer (_mtp_kinds) and its own pass through the output layer and loss."""
    m, recipe, tp, b = setup.model, setup.recipe, setup.layout.tensor, setup.shape.dtype_bytes
    pattern, tokens = moe_layer_pattern(m), setup.shape.tokens
    layers = [
        (pattern[i], fp8_layer(recipe.fp8, m.num_layers, i)) for a, z in setup.stage_ranges[stage] for i in range(a, z)
    ]
    if stage == setup.layout.pipeline - 1:
        layers += _mtp_kinds(setup)
    layer_forward = sum(kinds[k] for k in layers)
    forward = layer_forward
    if stage == setup.layout.pipeline - 1:
        head = _gemm_seconds(gpu, tokens, m.hidden_size, setup.vocab / tp, gpu.peak("bf16"), b)
        # vocabulary-parallel cross entropy is memory-bound: the logits written and read in bf16,
        # the fp32 softmax written and read twice (loss, gradient), the gradient written (per logit,
        # forward and backward together; a third of it counted here as the forward's share)
        head += tokens * setup.vocab / tp * (2 * b + 4 * 4) / (gpu.hbm_gbs * 1e9) / 3
        projection = _gemm_seconds(gpu, tokens, 2 * m.hidden_size, m.hidden_size / tp, gpu.peak("bf16"), b)
        forward += head + m.mtp_num_layers * (projection + head)
    return forward, layer_forward, len(layers), sum(moe for moe, _ in layers), sum(chunked[k] for k in layers)


def tp_overlap_exposed(setup: Setup, gpu: Gpu, collective: float, is_moe: bool, fp8: bool) -> float:
    """Exposed seconds of one layer's 6 tensor-parallel collectives that have no bulk overlap (the
    QKV and fc1 forward all-gathers, the projection and fc2 forward reduce-scatters, the projection
    and fc2 data-gradient all-gathers), `collective` seconds each. Without parallel.tp_comm_overlap
    all 6 are exposed. With it, transformer-engine's userbuffers (module/base.py: initialize_ub's
    default methods) pipeline each with its GEMM, `g` seconds (a data gradient costs its forward):
    - ring exchange (the all-gathers): tp steps, each computing on the chunk that arrived while the
      next (c/(tp-1)) travels; the local chunk needs no wait, so a step exposes only what its
      transfer takes beyond its GEMM chunk (g/tp): (tp-1) · max(0, c/(tp-1) - g/tp);
    - pipeline, 4 splits (the forward reduce-scatters): each split's output is reduce-scattered
      while the next split computes, the last split's reduce-scatter after every GEMM:
      c/4 + 3 · max(0, c/4 - g/4).
    Chunks are counted at the whole GEMM's rate (an assumption: TE's chunks are still large GEMMs);
    an MoE layer's expert MLP has no userbuffers, so its 3 stay exposed."""
    p = setup.recipe.parallel
    if not p.tp_comm_overlap or collective == 0.0:
        return 6 * collective
    m, tp = setup.model, setup.layout.tensor
    peak, gemm_b = _gemm_rate(setup, gpu, fp8)
    tokens = setup.shape.tokens

    def gemm(k: float, n: float) -> float:
        return _gemm_seconds(gpu, tokens, k, n, peak, gemm_b)

    def ring(g: float) -> float:
        return (tp - 1) * max(0.0, collective / (tp - 1) - g / tp)

    def pipeline(g: float, splits: int = 4) -> float:
        return collective / splits + (splits - 1) * max(0.0, (collective - g) / splits)

    gemms = attention_gemms(m)
    fed = sum(gemm(k, n / tp if split else n) for k, n, split in gemms[:-1] if k == m.hidden_size)
    k, n, _ = gemms[-1]
    projection = gemm(k / tp, n)
    # the pipelined and bulk overlaps communicate from UB_SMS of the GPU's SMs (ring exchange uses
    # copy engines): the GEMMs beside them run on the rest; bulk: the QKV's data and weight gradients
    shared = UB_SMS / (gpu.sms - UB_SMS)
    exposed = ring(fed) + pipeline(projection) + ring(projection) + shared * (projection + 2 * fed)
    if is_moe:
        return exposed + 3 * collective
    fc1, fc2 = gemm(m.hidden_size, 2 * m.ffn_hidden_size / tp), gemm(m.ffn_hidden_size / tp, m.hidden_size)
    return exposed + ring(fc1) + pipeline(fc2) + ring(fc2) + shared * (fc2 + 2 * fc1)


def _gemm_rate(setup: Setup, gpu: Gpu, fp8: bool) -> tuple[float, int]:
    """(peak FLOP/s, operand bytes) of the decoder's linears: the FP8 peak and one byte with fp8 on."""
    if fp8:
        return gpu.fp8_peak(), 1
    return gpu.peak(setup.recipe.train.precision), setup.shape.dtype_bytes


def _expert_seconds(setup: Setup, gpu: Gpu) -> float:
    """Seconds of one MoE layer's token exchange per micro-batch (exposed: megatron-core 0.16 overlaps
    it only with its 1F1B A2A overlap, not used here). EP: the dispatch and combine all-to-alls,
    forward and backward, top_k copies of every token. Expert-tensor parallelism (megatron-core's
    alltoall dispatcher): the tokens an expert rank received are all-gathered over its expert-tensor
    ranks and the experts' outputs reduce-scattered back, forward and backward (each rank sends its
    share to the other etp - 1 ranks)."""
    m, layout, shape = setup.model, setup.layout, setup.shape
    ep, etp = layout.expert, layout.expert_tensor or layout.tensor
    routed = shape.sharded_tokens * m.moe.top_k * m.hidden_size * shape.dtype_bytes  # bytes, balanced routing
    seconds = 4 * routed * (ep - 1) / ep / gpu.bandwidth(layout.tensor * layout.context * ep) if ep > 1 else 0.0
    if etp > 1:
        seconds += 4 * routed * (etp - 1) / gpu.bandwidth(etp)
    return seconds


def muon_time(setup: Setup, gpu: Gpu) -> float:
    """Seconds of Muon's step beyond AdamW's on the busiest stage (docs/optimizers.md, "Cost").

    Every rank runs the iteration on each whole matrix of its stage: per [m, n] matrix (m <= n)
    and step, X Xᵀ, G², and (bG + cG²) X: 4 m² n + 2 m³ multiply-adds x 2 FLOPs. Tensor
    parallelism all-gathers each matrix's fp32 shards ((t-1)/t of it, NVLink); the distributed
    optimizer all-reduces it whole over the data x context ranks (2 (d-1)/d), FSDP all-gathers it
    ((d-1)/d), on the network."""
    from planning.memory import stage_parameters
    from planning.muon_memory import adam_parameters

    m, layout, cfg = setup.model, setup.layout, setup.recipe.optimizer
    rate = gpu.peak("fp32" if cfg.ns_dtype == "fp32" else "bf16") * gpu.matmul_efficiency
    heads, h = m.num_attention_heads, m.hidden_size
    groups, hn = m.num_query_groups or heads, h // heads
    attention = [(heads * hn, h), (groups * hn, h), (groups * hn, h), (h, heads * hn)]
    if not cfg.split_qkv:
        attention = [((heads + 2 * groups) * hn, h), (h, heads * hn)]

    def mlp(ffn: int) -> list[tuple[int, int]]:
        return [(ffn, h), (ffn, h), (h, ffn)]

    def flops(shapes: list[tuple[int, int]]) -> float:
        return sum(2.0 * cfg.ns_steps * (4 * min(a, b) ** 2 * max(a, b) + 2 * min(a, b) ** 3) for a, b in shapes)

    pattern = moe_layer_pattern(m)
    local = (m.moe.num_experts or 0) // layout.expert
    dense_layer = flops(attention + mlp(m.ffn_hidden_size))
    moe_layer = flops(attention) + local * flops(mlp(m.moe.ffn_hidden_size or m.ffn_hidden_size))
    worst = 0.0
    for stage in range(layout.pipeline):
        moe = sum(sum(pattern[a:b]) for a, b in setup.stage_ranges[stage])
        layers = sum(b - a for a, b in setup.stage_ranges[stage])
        compute = ((layers - moe) * dense_layer + moe * moe_layer) / rate
        matrices = sum(stage_parameters(setup, stage)) - adam_parameters(setup, stage)  # this rank's shards
        tp, dp = layout.tensor, layout.data * layout.context
        wire = 4.0 * matrices * tp * (tp - 1) / tp / gpu.bandwidth(tp) if tp > 1 else 0.0
        if dp > 1 and (layout.fsdp is not None or setup.recipe.parallel.distributed_optimizer):
            times = 1 if layout.fsdp is not None else 2
            wire += times * 4.0 * matrices * (dp - 1) / dp / gpu.bandwidth(layout.world_size)
        worst = max(worst, compute + wire)
    return worst


def hsdp_and_offload_terms(setup: Setup, gpu: Gpu, params: int) -> tuple[Term, Term]:
    """The step's exposed terms for HSDP's all-reduce across shard groups (0 without HSDP) and for
    optimizer.cpu_offload's copies and host AdamW step (planning/offload.py; 0 without offload)."""
    replicas, offload = hsdp_replica_seconds(setup, gpu, params), offload_seconds(setup, gpu)
    return Term("hsdp_all_reduce", replicas, replicas), Term("optimizer_offload", offload, offload)

"""An analytic step time for a recipe and layout on a GPU cluster (docs/memory.md, "The planner"):
compute at an assumed fraction of the GPU's peak, tensor/context/expert/data/pipeline communication at
stated NVLink and InfiniBand bandwidths, the pipeline bubble, and recompute's extra forward."""

from __future__ import annotations

import dataclasses

from model.config import head_dim, moe_layer_pattern
from planning.flops import layer_totals, recompute_forward_flops
from planning.memory import Setup, stage_parameters


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model, as the planner assumes it (vendor datasheet figures, dense, no sparsity)."""

    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak
    tf32_tflops: float
    nvlink_gbs: float  # NVLink bandwidth per GPU per direction, GB/s
    network_gbs: float  # InfiniBand per GPU (one NIC per GPU), GB/s
    matmul_efficiency: float = 0.55  # fraction of peak large GEMMs reach in a training step
    gpus_per_node: int = 8

    def peak(self, precision: str) -> float:
        return (self.bf16_tflops if precision != "fp32" else self.tf32_tflops) * 1e12


GPUS = {
    # H100 SXM: 989 TFLOPS bf16, NVLink 4 (900 GB/s both directions), ConnectX-7 400 Gb/s
    "h100": Gpu("h100", 989.0, 494.0, 450.0, 50.0),
    # H200 SXM: H100's compute and links, 141 GB of HBM3e
    "h200": Gpu("h200", 989.0, 494.0, 450.0, 50.0),
    # B200: 2.25 PFLOPS bf16 dense, NVLink 5 (1.8 TB/s both directions), ConnectX-8 800 Gb/s
    "b200": Gpu("b200", 2250.0, 1125.0, 900.0, 100.0, matmul_efficiency=0.5),
}


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute: float  # seconds of matmul and attention work on the busiest stage, bubble included
    tensor: float
    context: float
    expert: float
    data: float
    pipeline: float
    model_flops: float  # the step's useful FLOPs over all GPUs (no recompute), for MFU
    # Muon's Newton-Schulz on the stage's whole matrices and the gathers that rebuild them
    # (optimizer.name = muon; 0 for AdamW, whose step the planner leaves out)
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.tensor + self.context + self.expert + self.data + self.pipeline + self.optimizer

    def mfu(self, gpu: Gpu, precision: str, gpus: int) -> float:
        return self.model_flops / (self.total * gpus * gpu.peak(precision))


def _bandwidth(gpu: Gpu, span: int) -> float:
    """Bytes/s of a group spanning `span` consecutive ranks: NVLink inside a node, else the network."""
    return (gpu.nvlink_gbs if span <= gpu.gpus_per_node else gpu.network_gbs) * 1e9


def step_time(setup: Setup, gpu: Gpu) -> StepTime:
    """Seconds per optimizer step. Communication is counted as exposed (this project runs
    megatron-core's DDP without overlap; tensor-parallel collectives are not overlapped either), except
    the ring's K/V passes, which hide behind the attention they feed."""
    m, layout, shape = setup.model, setup.layout, setup.shape
    tp, cp, ep, pp = layout.tensor, layout.context, layout.expert, layout.pipeline
    precision, b = setup.recipe.train.precision, shape.dtype_bytes
    pattern = moe_layer_pattern(m)
    tokens = shape.tokens  # per micro-batch on one rank's sequence shard
    flops_rate = gpu.peak(precision) * gpu.matmul_efficiency
    chunks = pp * layout.model_chunks
    per_layer = layer_totals(m)
    recompute = recompute_forward_flops(m, chunks) / len(pattern)
    layers_per_stage = len(pattern) / pp
    head = 2.0 * m.hidden_size * setup.vocab
    stage_forward = (sum(per_layer) / len(pattern) * layers_per_stage + head / pp) * tokens / (tp * 1.0)
    micro_batch = (3 * stage_forward + recompute * layers_per_stage * tokens / tp) / flops_rate
    mb = setup.micro_batches
    compute = micro_batch * (mb + (pp - 1) / layout.model_chunks)  # 1F1B: the bubble is (pp - 1)/vpp micro-batches
    # TP with SP: per layer 4 all-gathers/reduce-scatters forward, 6 backward, of [s·b, h] each, (t-1)/t on the wire
    hidden_bytes = tokens * m.hidden_size * b
    tensor = 10 * hidden_bytes * (tp - 1) / tp / _bandwidth(gpu, tp) * layers_per_stage * mb if tp > 1 else 0.0
    # CP ring: K and V (forward), K, V, dK, dV (backward) around cp - 1 hops; hidden behind attention
    kv = (m.num_query_groups or m.num_attention_heads) * head_dim(m)
    ring = 3 * 2 * tokens * kv // tp * b * (cp - 1) / _bandwidth(gpu, tp * cp)
    attention = 3 * 2.0 * m.seq_length * m.num_attention_heads * head_dim(m) * tokens / tp / flops_rate
    context = max(ring - attention, 0.0) * layers_per_stage * mb if cp > 1 else 0.0
    # EP: dispatch and combine all-to-alls forward and backward, top_k copies of every token
    moe_layers = sum(pattern) / pp
    a2a = 4 * shape.sharded_tokens * m.moe.top_k * m.hidden_size * b * (ep - 1) / ep
    expert = a2a / _bandwidth(gpu, tp * cp * ep) * moe_layers * mb if ep > 1 else 0.0
    data = _data_parallel_time(setup, gpu)
    # pipeline: each micro-batch crosses each chunk boundary forward and backward
    pipeline = (
        2 * hidden_bytes / tp / _bandwidth(gpu, gpu.gpus_per_node + 1) * mb * layout.model_chunks if pp > 1 else 0.0
    )
    tokens_per_step = setup.recipe.train.global_batch_size * m.seq_length
    model_flops = 3 * (sum(per_layer) + head) * tokens_per_step
    optimizer = muon_time(setup, gpu) if setup.recipe.optimizer.name == "muon" else 0.0
    return StepTime(compute, tensor, context, expert, data, pipeline, model_flops, optimizer)


def muon_time(setup: Setup, gpu: Gpu) -> float:
    """Seconds of Muon's step beyond AdamW's on the busiest stage (docs/optimizers.md, "Cost").

    Every rank runs the iteration on each whole matrix of its stage: per [m, n] matrix (m <= n)
    and step, X Xᵀ, G², and (bG + cG²) X: 4 m² n + 2 m³ multiply-adds x 2 FLOPs. Tensor
    parallelism all-gathers each matrix's fp32 shards ((t-1)/t of it, NVLink); the distributed
    optimizer all-reduces it whole over the data x context ranks (2 (d-1)/d), FSDP all-gathers it
    ((d-1)/d), on the network."""
    from planning.memory import adam_parameters, stage_parameters

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
        wire = 4.0 * matrices * tp * (tp - 1) / tp / _bandwidth(gpu, tp) if tp > 1 else 0.0
        if dp > 1 and (layout.fsdp is not None or setup.recipe.parallel.distributed_optimizer):
            times = 1 if layout.fsdp is not None else 2
            wire += times * 4.0 * matrices * (dp - 1) / dp / _bandwidth(gpu, layout.world_size)
        worst = max(worst, compute + wire)
    return worst


def _data_parallel_time(setup: Setup, gpu: Gpu) -> float:
    """The distributed optimizer's reduce-scatter of fp32 gradients and all-gather of the weights
    (a plain all-reduce moves as much), over the data × context ranks, on the network."""
    layout = setup.layout
    dp = layout.data * layout.context
    if dp == 1:
        return 0.0
    params = max(sum(stage_parameters(setup, p)) for p in range(layout.pipeline))
    weight_bytes = setup.shape.dtype_bytes
    return params * (4 + weight_bytes) * (dp - 1) / dp / _bandwidth(gpu, layout.world_size)

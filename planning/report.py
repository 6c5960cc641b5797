"""The memory estimate as `--dry-run` shows it: a per-rank table naming the worst rank, whether it
fits a GPU's memory and, when it does not, the cheapest recompute setting that would; or as JSON."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING, Any

from common.errors import RecipeError
from model.config import check_model, chunk_layer_counts
from model.moe_config import moe_layer_pattern
from planning.flops import model_forward_flops, recompute_forward_flops
from planning.memory import GIB, MIB, MemoryEstimate, Setup, StageMemory, Target, estimate_setup, setup_for
from planning.offload import host_lines, host_state

if TYPE_CHECKING:
    from pretrain.recipe import Recipe

# What a GPU needs beyond the tensors the model counts (docs/memory.md, "What the model leaves out"):
# the CUDA context with cuBLAS/cuDNN workspaces, NCCL's buffers for the run's communicators, and the
# caching allocator's reserved-but-unused blocks as a fraction of the peak.
CUDA_CONTEXT_GIB = 0.75
NCCL_GIB = 1.0
FRAGMENTATION = 0.05


def reserve_bytes(stage: StageMemory, target: Target) -> int:
    """The bytes beyond a stage's peak a device needs (none on the CPU, where there is no context to
    hold); fragmentation is the caching allocator's, so over what torch allocates: not over TE's
    userbuffers, which it registers with the driver directly."""
    if target.kernels.device != "cuda":
        return 0
    return int((stage.peak - stage.userbuffers) * FRAGMENTATION + (CUDA_CONTEXT_GIB + NCCL_GIB) * GIB)


@dataclasses.dataclass(frozen=True)
class Fit:
    gpu_bytes: int
    needed: int  # worst peak plus the reserve

    @property
    def fits(self) -> bool:
        return self.needed <= self.gpu_bytes


@dataclasses.dataclass(frozen=True)
class Recompute:
    """A recompute setting as recipe overrides, its extra forward compute and its worst peak."""

    overrides: list[str]
    extra_forward: float  # recomputed forward FLOPs / the model's forward FLOPs
    needed: int


def recompute_candidates(recipe: Recipe) -> list[dict[str, Any]]:
    """Every recompute setting megatron-core can run for this model and layout (model fields)."""
    m, p = recipe.model, recipe.parallel
    pattern = moe_layer_pattern(m)
    modules = ["core_attn", "layernorm"]
    modules += ["mlp"] if not all(pattern) else []
    modules += ["moe"] if any(pattern) else []
    modules += ["moe_act"] if any(pattern) and m.moe.grouped_gemm else []
    modules += ["shared_experts"] if any(pattern) and m.moe.shared_expert_ffn_hidden_size else []
    candidates: list[dict[str, Any]] = [{"recompute_granularity": None}]
    for n in range(1, len(modules) + 1):
        for chosen in itertools.combinations(modules, n):
            candidates.append({"recompute_granularity": "selective", "recompute_modules": list(chosen)})
    chunk = min(chunk_layer_counts(m, p))
    for n in range(1, chunk + 1):
        candidates.append({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": n})
        if chunk % n == 0:
            candidates.append(
                {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": n}
            )
    valid = []
    for fields in candidates:
        try:
            check_model(with_recompute(recipe, fields).model, p)
        except RecipeError:
            continue
        valid.append(fields)
    return valid


def with_recompute(recipe: Recipe, fields: dict[str, Any]) -> Recipe:
    """The recipe with its recompute keys replaced by `fields` (the unnamed ones unset)."""
    unset = {"recompute_granularity": None, "recompute_modules": None, "recompute_method": None}
    model = dataclasses.replace(recipe.model, **(unset | {"recompute_num_layers": None} | fields))
    return dataclasses.replace(recipe, model=model)


def as_overrides(fields: dict[str, Any]) -> list[str]:
    out = []
    for key, value in fields.items():
        text = "null" if value is None else f"[{','.join(value)}]" if isinstance(value, list) else str(value)
        out.append(f"model.{key}={text}")
    return out


def cheapest_recompute(setup: Setup, gpu_bytes: int) -> Recompute | None:
    """The fitting recompute setting with the least extra forward compute (then the lowest peak)."""
    base = setup.recipe
    chunks = setup.layout.pipeline * setup.layout.model_chunks
    forward = model_forward_flops(base.model, setup.vocab)
    options = []
    for fields in recompute_candidates(base):
        recipe = with_recompute(base, fields)
        worst = estimate_setup(dataclasses.replace(setup, recipe=recipe)).worst
        needed = worst.peak + reserve_bytes(worst, setup.target)
        if needed <= gpu_bytes:
            extra = recompute_forward_flops(recipe.model, chunks) / forward
            options.append(Recompute(as_overrides(fields), extra, needed))
    return min(options, key=lambda r: (r.extra_forward, r.needed), default=None)


# ------------------------------------------------------------------------------------------ rendering


def significant(x: float, digits: int = 3) -> str:
    """`x` to `digits` significant digits in plain notation (0.000123, 1.73, 12.3; 1234 keeps its units)."""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def duration(seconds: float) -> str:
    """A time for people: seconds with 3 decimals from a second up, else ms or µs to 3 significant digits."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{significant(seconds * 1e3)} ms"
    return f"{significant(seconds * 1e6)} µs"


def aligned(rows: list[list[str]], left: frozenset[int] = frozenset(), indent: str = "  ") -> list[str]:
    """`rows` (the first the header) as text columns two spaces apart, each as wide as its longest
    cell: right-aligned, but the columns in `left`."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _gib(n: int) -> float:
    return round(n / GIB, 6)


def _ranks(stage: StageMemory) -> str:
    r = stage.ranks
    return f"rank {r.start}" if len(r) == 1 else f"ranks {r.start}-{r.stop - 1}"


def _unit(n: int) -> tuple[str, int]:
    """GiB for a GPU-sized model, MiB below 1 GiB (the CPU recipes)."""
    return ("GiB", GIB) if n >= GIB else ("MiB", MIB)


def _size(n: int, unit: tuple[str, int]) -> str:
    return f"{n / unit[1]:.2f} {unit[0]}"


COLUMNS = ("weights", "grads", "optimizer", "comm_buffers", "gathered", "activations", "logits", "transient")
_HEADS = {"weights": "weights", "grads": "grads", "optimizer": "optimizer", "comm_buffers": "buffers"}
_HEADS |= {"gathered": "gathered", "activations": "activations", "logits": "logits", "transient": "transient"}
_WIDTHS = {"weights": 8, "grads": 9, "optimizer": 11, "comm_buffers": 9, "gathered": 10, "activations": 13}
_WIDTHS |= {"logits": 9, "transient": 11, "peak": 9}


def table_lines(estimate: MemoryEstimate, setup: Setup) -> list[str]:
    """The per-stage table (every rank of a stage holds the same), then the worst rank's peak; the
    FSDP column (weights gathered to compute) only under parallel.fsdp."""
    worst = estimate.worst
    unit = _unit(worst.peak)
    columns = [c for c in COLUMNS if c != "gathered" or setup.layout.fsdp] + ["peak"]
    gathered = "FSDP-gathered weights, " if setup.layout.fsdp else ""
    lines = [
        f"memory per rank ({unit[0]}, {setup.target.kernels.device} kernels; docs/memory.md): "
        f"weights, gradient buffers, optimizer state, communication buffers, {gathered}activations held (of "
        "which logits/loss), largest transient, peak",
        "  stage  ranks       " + "".join(f"{_HEADS.get(c, c):>{_WIDTHS[c]}}" for c in columns),
    ]
    for s in estimate.stages:
        values = [getattr(s, c) for c in columns]
        first, last = s.ranks.start, s.ranks.stop - 1
        ranks = f"{first}" if first == last else f"{first}-{last}"
        lines.append(
            f"  {s.pipeline_rank:<5}  {ranks:<11}"
            + "".join(f"{v / unit[1]:>{_WIDTHS[c]}.2f}" for v, c in zip(values, columns))
        )
    n = worst.in_flight
    in_flight = f"{n} micro-batch{'es' if n != 1 else ''} in flight"
    if setup.layout.virtual_pipeline:
        in_flight = f"{n} model-chunk micro-batches in flight"
    lines.append(
        f"worst: pipeline stage {worst.pipeline_rank} ({_ranks(worst)}), peak {_size(worst.peak, unit)} ({in_flight})"
    )
    return lines + not_modelled(setup) + host_lines(setup)


def not_modelled(setup: Setup) -> list[str]:
    """What the recipe asks for that the estimate does not model, one line each (docs/memory.md)."""
    if not setup.recipe.fp8.enabled or setup.target.kernels.transformer_engine:
        return []  # transformer-engine's FP8 copies and weights are modelled (docs/planner.md)
    return [
        "not modelled: fp8 linears keep an FP8 copy of their input (the gathered one under sequence "
        "parallelism) instead of its bf16 bytes; counted as bf16 (to measure)"
    ]


def fit_lines(estimate: MemoryEstimate, setup: Setup, gpu_gib: float) -> list[str]:
    worst = estimate.worst
    reserve = reserve_bytes(worst, setup.target)
    needed, gpu = worst.peak + reserve, int(gpu_gib * GIB)
    unit = _unit(max(needed, gpu))
    what = f"peak {_size(worst.peak, unit)}"
    if reserve:
        what += f" + {_size(reserve, unit)} reserve (CUDA context, NCCL, fragmentation) = {_size(needed, unit)}"
    if needed <= gpu:
        return [f"fits in {gpu_gib:g} GiB: {what}"]
    lines = [f"does not fit in {gpu_gib:g} GiB by {_size(needed - gpu, unit)}: {what}"]
    best = cheapest_recompute(setup, gpu)
    if best is None:
        lines.append(
            "no recompute setting fits: add pipeline or tensor parallel ranks, or lower train.micro_batch_size"
        )
    else:
        lines.append(
            f"cheapest recompute that fits: {' '.join(best.overrides)} "
            f"(needs {_size(best.needed, unit)}; recomputes {100 * best.extra_forward:.1f} % of the forward)"
        )
    return lines


def memory_json(estimate: MemoryEstimate, setup: Setup, gpu_gib: float | None) -> dict[str, Any]:
    worst = estimate.worst
    reserve = reserve_bytes(worst, setup.target)
    out: dict[str, Any] = {f"{c}_gib": _gib(getattr(worst, c)) for c in COLUMNS}
    out.update(
        peak_gib=_gib(worst.peak),
        reserve_gib=_gib(reserve),
        worst_pipeline_rank=worst.pipeline_rank,
        worst_ranks=[worst.ranks.start, worst.ranks.stop - 1],
        in_flight=worst.in_flight,
        device=setup.target.kernels.device,
        not_modelled=not_modelled(setup),
        host_gib=_gib(max(host_state(setup, p) for p in range(setup.layout.pipeline))),  # optimizer.cpu_offload
        stages=[
            {
                "pipeline_rank": s.pipeline_rank,
                "ranks": [s.ranks.start, s.ranks.stop - 1],
                **{f"{c}_gib": _gib(getattr(s, c)) for c in COLUMNS},
                "peak_gib": _gib(s.peak),
                "in_flight": s.in_flight,
            }
            for s in estimate.stages
        ],
    )
    if gpu_gib is not None:
        gpu = int(gpu_gib * GIB)
        needed = worst.peak + reserve
        out.update(gpu_memory_gib=gpu_gib, fits=needed <= gpu, short_by_gib=_gib(max(needed - gpu, 0)))
        best = None if needed <= gpu else cheapest_recompute(setup, gpu)
        out["cheapest_recompute"] = (
            None
            if best is None
            else {
                "overrides": best.overrides,
                "needed_gib": _gib(best.needed),
                "extra_forward": round(best.extra_forward, 4),
            }
        )
    return out


def dry_run_setup(recipe: Recipe, world_size: int, vocab: int, node_size: int | None = None) -> Setup:
    """The target of a dry run: the CPU when the recipe says train.device = cpu, else a GPU."""
    device = "cpu" if recipe.train.device == "cpu" else "cuda"
    return setup_for(recipe, world_size, Target.for_device(device, recipe.model.transformer_impl), vocab, node_size)

"""`--dry-run`: validate a recipe for a world size; print the layout, parameter counts and per-rank
memory (memory.py), as text or one JSON object; no weights are allocated."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, NamedTuple

from data.loader import BatchPlan
from model.gpt import parameter_counts
from parallel.layout import Layout
from planning.gpus import GPUS
from planning.memory import Target, estimate_setup, setup_for, stage_parameters
from planning.report import dry_run_setup, duration, fit_lines, memory_json, table_lines
from planning.setup import validate_for_world, vocab_size
from planning.step_time import step_time

if TYPE_CHECKING:
    from pretrain.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class StagePlacement:
    """What one pipeline rank holds: its layer ranges (one per virtual chunk) and parameters per TP rank."""

    pipeline_rank: int
    layers: tuple[tuple[int, int], ...]  # half-open [first, last) global layer indices per chunk
    params_per_rank: int


class Placement(NamedTuple):
    """Where a recipe's pieces go at a world size (not the BatchPlan, which is one of them)."""

    layout: Layout
    batch: BatchPlan
    vocab: int  # padded
    stages: list[StagePlacement]


def placement(recipe: Recipe, world_size: int, node_size: int | None = None) -> Placement:
    """The layout, batch plan, padded vocabulary and per-stage parameters for `world_size` ranks
    (`node_size` per node: parallel.fsdp_shard_size = node)."""
    layout, batch = validate_for_world(recipe, world_size, node_size)
    setup = setup_for(recipe, world_size, vocab=vocab_size(recipe), node_size=node_size)
    stages = [
        StagePlacement(p, ranges, sum(stage_parameters(setup, p)))  # the memory model's count: one counter
        for p, ranges in enumerate(setup.stage_ranges)
    ]
    return Placement(layout, batch, setup.vocab, stages)


def meta_parameter_count(recipe: Recipe, vocab: int) -> int:
    """Builds the whole model (TP=PP=1) on the meta device and counts; allocates no weights."""
    from model.gpt import ModelBuild, build_model_chunks, meta_device
    from parallel.layout import init_single_process, shutdown

    init_single_process()
    try:
        build = ModelBuild(perform_initialization=False)
        # The local spec has the same parameters as transformer-engine's (TE only fuses the
        # norms into the linears), and builds without TE installed.
        local = dataclasses.replace(recipe.model, transformer_impl="local")
        with meta_device():
            chunk = build_model_chunks(local, build, vocab)[0]
        return sum(p.numel() for p in chunk.parameters())
    finally:
        shutdown()


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def dry_run(
    recipe: Recipe,
    world_size: int,
    gpu_memory_gib: float | None = None,
    as_json: bool = False,
    gpu: str | None = None,
    gpus_per_node: int | None = None,
) -> str:
    """The dry run's report: text lines, or one JSON object when `as_json`. `gpu` (a planning.gpus.GPUS
    name): memory on that GPU (its memory unless `gpu_memory_gib` says otherwise) and the step time.
    `gpus_per_node`: processes per node, which parallel.fsdp_shard_size = node needs (no default:
    a GPU table's NVLink domain is not always a node)."""
    layout, batch_plan, vocab, stages = placement(recipe, world_size, gpus_per_node)
    counts = parameter_counts(recipe.model, vocab)
    built = meta_parameter_count(recipe, vocab)
    if gpu is not None:
        device = GPUS[gpu]
        target = Target.for_device("cuda", recipe.model.transformer_impl)
        setup = setup_for(recipe, world_size, target, vocab_size(recipe), gpus_per_node)
        gpu_memory_gib = gpu_memory_gib or device.memory_gib
        timing = step_time(setup, device)
    else:
        setup = dry_run_setup(recipe, world_size, vocab_size(recipe), gpus_per_node)
    estimate = estimate_setup(setup)
    tokens = recipe.train.global_batch_size * recipe.model.seq_length
    if as_json:
        extra = {"step_time": timing.as_json(tokens, world_size, device)} if gpu is not None else {}
        return json.dumps(
            _report(recipe, world_size, layout, batch_plan, vocab, stages, counts.active, built)
            | {
                "memory": memory_json(estimate, setup, gpu_memory_gib),
                "missing_data": missing_data(recipe),
                "not_runnable_here": not_runnable(recipe),
            }
            | extra
        )
    lines = [
        f"recipe {recipe.source}: valid for world size {world_size}",
        f"layout: {layout.describe()}",
        f"micro-batches per step: {batch_plan.micro_batches}",
        f"communication overlap: {recipe.parallel.overlap_description()}",
        f"vocabulary: {vocab} (padded)",
        f"parameters: {built:,} total ({_human(built)}; formula {counts.total:,})",
    ]
    if counts.mtp:
        main = counts.total - counts.mtp
        lines.append(
            f"multi-token prediction: {counts.mtp:,} parameters ({_human(counts.mtp)}) of them; "
            f"{main:,} ({_human(main)}) without"
        )
    if recipe.model.moe.num_experts is not None:
        lines.append(
            f"active parameters per token: {counts.active:,} ({_human(counts.active)}; "
            f"top-{recipe.model.moe.top_k} of {recipe.model.moe.num_experts} experts)"
        )
    for s in stages:
        lines.append(
            f"  pipeline stage {s.pipeline_rank}: {layers_text(s.layers)}; {s.params_per_rank:,} parameters per rank"
        )
    lines += table_lines(estimate, setup)
    if gpu_memory_gib is not None:
        lines += fit_lines(estimate, setup, gpu_memory_gib)
    if gpu is not None:
        lines += step_time_lines(timing.as_json(tokens, world_size, device))
    lines.extend(missing_data(recipe))
    stops = not_runnable(recipe)
    if stops:
        lines.append(f"not runnable here: {'; '.join(stops)}")
    return "\n".join(lines)


def step_time_lines(t: dict[str, Any]) -> list[str]:
    """The step time as text: the total, the throughput, and each term with what of it is exposed."""
    lines = [
        f"step time on {t['gpu']}: {duration(t['seconds'])}, {t['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
        f"{t['tflops_per_gpu']:.0f} TFLOP/s/GPU ({t['flops_convention']})"
    ]
    for name, term in t["terms"].items():
        if term["seconds"]:
            lines.append(f"  {name:<20} {duration(term['seconds']):>10}, {duration(term['exposed']):>10} exposed")
    return lines


def layers_text(ranges: tuple[tuple[int, int], ...]) -> str:
    """A stage's half-open layer ranges for people: "layer 0", "layers 0-3", "layers 0-1, 4-5"."""
    if len(ranges) == 1 and ranges[0][1] - ranges[0][0] == 1:
        return f"layer {ranges[0][0]}"
    return "layers " + ", ".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in ranges)


def _report(
    recipe: Recipe, world: int, layout: Layout, batch: BatchPlan, vocab: int, stages: list, active: int, built: int
) -> dict[str, Any]:
    return {
        "recipe": recipe.source,
        "world_size": world,
        "layout": layout.describe(),
        "micro_batches": batch.micro_batches,
        "vocabulary_padded": vocab,
        "parameters": {"total": built, "active": active},
        "stages": [
            {
                "pipeline_rank": s.pipeline_rank,
                "layers": [list(r) for r in s.layers],
                "parameters_per_rank": s.params_per_rank,
            }
            for s in stages
        ],
    }


def not_runnable(recipe: Recipe) -> list[str]:
    """What would stop a real run of `recipe` on this machine at once, though the layout is valid:
    no training data, data files that are not here, a tokenizer path that is not here."""
    from data.dataset import blend_of
    from data.tokenizer import looks_like_a_path

    d = recipe.data
    stops = []
    if not blend_of(d.path, d.blend):
        stops.append("no training data (data.path and data.blend are null)")
    prefixes = [p for _, p in blend_of(d.path, d.blend) + blend_of(d.valid_path, d.valid_blend)]
    stops += [
        f"data file '{prefix}.bin' not found"
        for prefix in prefixes
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"))
    ]
    if d.tokenizer != "byte" and looks_like_a_path(d.tokenizer) and not os.path.exists(d.tokenizer):
        stops.append(f"data.tokenizer '{d.tokenizer}' not found")
    return stops


def missing_data(recipe: Recipe) -> list[str]:
    """A line per data file the recipe names that is not on this machine: the layout is valid, but
    training here would stop at it (on a cluster the files may live where the run starts)."""
    from data.dataset import blend_of, build_command

    d = recipe.data
    prefixes = [p for _, p in blend_of(d.path, d.blend) + blend_of(d.valid_path, d.valid_blend)]
    return [
        f"data: '{prefix}.bin/.idx' not found on this machine: {build_command(prefix)}"
        for prefix in prefixes
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"))
    ]

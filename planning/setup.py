"""A recipe at a world size: the layout and batch plan (checked as the run checks them), each
pipeline rank's layers, the vocabulary. The trainer, the dry run and the planner all start here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import RecipeError
from data.loader import BatchPlan
from parallel.config import pipeline_stage_layers
from parallel.layout import Layout

if TYPE_CHECKING:  # a type only: planning reads the recipe's sections, pretrain/ owns the whole
    from pretrain.recipe import Recipe


def validate_for_world(recipe: Recipe, world_size: int, node_size: int | None = None) -> tuple[Layout, BatchPlan]:
    """The layout for `world_size` ranks (`node_size` per node, for parallel.fsdp_shard_size = node)
    and this recipe's batch plan on them (rank 0's share); raises RecipeError when the layout does
    not fit or the global batch does not split evenly."""
    layout = Layout.from_config(recipe.parallel, world_size, node_size)
    t = recipe.train
    beyond = [r for r in t.profile.ranks if r >= world_size] if t.profile.start_step is not None else []
    if beyond:
        raise RecipeError(f"train.profile.ranks {beyond} are not ranks of a world of {world_size}")
    plan = BatchPlan(t.global_batch_size, t.micro_batch_size, layout.data)
    if layout.pipeline > 1 and plan.micro_batches < layout.pipeline:
        raise RecipeError(
            f"{plan.micro_batches} micro-batches per step (train.global_batch_size / "
            f"(micro_batch_size × data-parallel size)) are fewer than parallel.pipeline = "
            f"{layout.pipeline}: raise train.global_batch_size"
        )
    if layout.virtual_pipeline is not None and plan.micro_batches % layout.pipeline:
        raise RecipeError(
            f"{plan.micro_batches} micro-batches per step are not a multiple of parallel.pipeline = "
            f"{layout.pipeline}, which the interleaved schedule (parallel.virtual_pipeline) needs"
        )
    return layout, plan


def stage_layers(recipe: Recipe, layout: Layout) -> list[tuple[tuple[int, int], ...]]:
    """megatron-core's split: chunk c of pipeline rank p holds block c·pp + p (even blocks), or
    one contiguous range per rank with a first/last-stage adjustment."""
    num_layers = recipe.model.num_layers
    if layout.first_stage_layers is not None or layout.last_stage_layers is not None:
        counts = pipeline_stage_layers(recipe.parallel, num_layers)
        starts = [sum(counts[:p]) for p in range(layout.pipeline)]
        return [((a, a + n),) for a, n in zip(starts, counts)]
    chunks = layout.model_chunks
    per_block = num_layers // (layout.pipeline * chunks)
    plans = []
    for p in range(layout.pipeline):
        blocks = [c * layout.pipeline + p for c in range(chunks)]
        plans.append(tuple((b * per_block, (b + 1) * per_block) for b in blocks))
    return plans


def vocab_size(recipe: Recipe) -> int:
    """The recipe's vocabulary before padding: model.vocab_size, else its tokenizer's."""
    if recipe.model.vocab_size:
        return recipe.model.vocab_size
    from data.tokenizer import build_tokenizer

    return build_tokenizer(recipe.data.tokenizer).vocab_size

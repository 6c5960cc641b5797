"""The `parallel` recipe section: how many ranks split each axis, and its own checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.errors import RecipeError
from common.schema import PositiveInt


@dataclass
class ParallelConfig:
    """Model-parallel layout; the data-parallel size is what is left of the world size."""

    tensor: PositiveInt = 1  # ranks that split each layer's weights
    pipeline: PositiveInt = 1  # ranks that split the layer stack
    virtual_pipeline: PositiveInt | None = None  # None = no interleaving; else model chunks per pipeline rank
    context: PositiveInt = 1  # ranks that split each sequence
    # How context-parallel attention communicates. p2p: K/V travel around a ring (ours with the local
    # layers, transformer-engine's otherwise); a2a (all-to-all between sequence and heads) and
    # all_gather (of K/V) exist only in transformer-engine's attention.
    context_comm: Literal["p2p", "a2a", "all_gather"] = "p2p"
    expert: PositiveInt = 1  # ranks that split the experts (MoE); carved out of the data-parallel ranks
    expert_tensor: PositiveInt | None = None  # ranks that split each expert's weights; null = parallel.tensor
    sequence_parallel: bool = False  # shard activations along the sequence inside tensor-parallel regions
    distributed_optimizer: bool = False  # shard optimizer state across data-parallel ranks
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

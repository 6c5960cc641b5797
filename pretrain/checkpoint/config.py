"""The `checkpoint` recipe section (torch-free: loading a recipe imports it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.schema import NonNegativeInt, PositiveInt


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None = <logging.dir>/checkpoints
    interval: NonNegativeInt = 0  # save every N steps; 0 = only at the end
    load: str | None = None  # None | "auto" (latest complete checkpoint in dir) | a path
    save: bool = True
    keep_last: PositiveInt | None = (
        None  # keep the N newest complete checkpoints (null = all); never deletes the newest
    )
    async_save: bool = False  # write shards in a background process while training goes on
    # Distributed-optimizer state: fully_reshardable (resume at any layout; gathered per data-parallel
    # group when saving) | dp_reshardable (each rank's shard as is: faster, only the data-parallel size may change)
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"

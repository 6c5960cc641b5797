"""The `checkpoint` recipe section (torch-free: loading a recipe imports it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.schema import NonNegativeInt, PositiveInt


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None = <logging.dir>/checkpoints
    interval: NonNegativeInt = 0  # save every N steps; 0 = only at the end
    load: str | None = None  # None | "auto" (newest intact checkpoint in dir) | a path
    save: bool = True
    keep_last: PositiveInt | None = (
        None  # keep the N newest complete checkpoints (null = all); never deletes the newest
    )
    async_save: bool = False  # write shards in a background process while training goes on
    # Before a load, check every file's CRC32 against the checkpoint's manifest (sizes are always
    # checked); the ranks split the reading. About 0.6-1.3 s per GiB per rank (docs/benchmarks.md).
    verify: bool = True
    # Distributed-optimizer state: fully_reshardable (resume at any layout; gathered per data-parallel
    # group when saving) | dp_reshardable (each rank's shard as is: faster, only the data-parallel size may change)
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"

"""Fault injection of the `debug` section that acts on collectives and memory: a rank that never
enters a collective (debug.hang_*) and an out-of-memory error (debug.oom_*). Tests and new clusters
use them to see the hang report and the out-of-memory report; never set in a real run."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from common.errors import RecipeError

if TYPE_CHECKING:
    from pretrain.recipe import DebugConfig, TrainConfig


def check_debug(debug: DebugConfig, train: TrainConfig) -> None:
    if debug.hang_at_step is not None and not train.watchdog_timeout_s > 0:
        raise RecipeError(
            "debug.hang_at_step needs train.watchdog_timeout_s > 0: the watchdog's record of the "
            "collectives is where a rank skips one, and what reports the hang"
        )


def check_debug_for_world(debug: DebugConfig, world_size: int) -> None:
    for key, at_step, rank in (
        ("hang", debug.hang_at_step, debug.hang_rank),
        ("oom", debug.oom_at_step, debug.oom_rank),
    ):
        if at_step is not None and rank >= world_size:
            raise RecipeError(f"debug.{key}_rank = {rank} is not a rank of a world of {world_size}")


def hang_before_collective(debug: DebugConfig, rank: int, ring: Any) -> Callable[[str, str], None] | None:
    """debug.hang_at_step: on rank debug.hang_rank, the first collective of that step (of phase
    debug.hang_phase when set) is never entered: the rank sleeps there until it is killed."""
    if debug.hang_at_step is None or debug.hang_rank != rank:
        return None

    def before_entering(op: str, group: str) -> None:
        if ring.step != debug.hang_at_step or debug.hang_phase not in (None, ring.phase):
            return
        print(
            f"debug: rank {rank} does not enter {op} at step {ring.step} phase {ring.phase} "
            f"(debug.hang_at_step); it sleeps here instead",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)

    return before_entering


def raise_out_of_memory(debug: DebugConfig | None, rank: int, step: int, phase: str) -> None:
    """debug.oom_at_step: torch.OutOfMemoryError on rank debug.oom_rank in phase debug.oom_phase of
    that step, worded as the CUDA caching allocator words it."""
    if debug is None or debug.oom_at_step != step or debug.oom_phase != phase or debug.oom_rank != rank:
        return
    import torch

    raise torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of {debug.oom_device_gib:g} "
        f"GiB of which 0 bytes is free. (debug.oom_at_step)"
    )

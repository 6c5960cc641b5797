"""Fault injection: the `debug` recipe section, to watch the fault guards work (tests, a new
cluster); never set in a real run. The step calls it through one hook (`FaultInjection.around`), the
checkpointer asks it how long to pause; with nothing set, neither changes anything.

A new fault is a `DebugConfig` key and a line in the hook (or a method the component that should
fail asks), plus a test that shows the guard it exercises catching it. Imports of torch stay inside
the functions: loading a recipe imports this module and stays free of torch."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from common.errors import RecipeError
from common.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

# The phases of a step the watchdog times (pretrain/guards.py:Watchdog.phase).
WatchedPhase = Literal["data", "forward_backward", "optimizer", "evaluation", "logging", "checkpoint"]


@dataclass
class DebugConfig:
    """Fault injection, to watch the fault guards work (tests, a new cluster); never set in a real run."""

    nan_loss_at_step: PositiveInt | None = None  # 1-based step whose loss is multiplied by NaN on every rank
    # 1-based step after whose backward one gradient element on rank 0 is set to NaN (the loss stays
    # finite): the guard's gradient check and the agreement of every rank on it
    nan_grad_at_step: PositiveInt | None = None
    stall_at_step: PositiveInt | None = None  # 1-based step whose forward/backward first sleeps debug.stall_s
    stall_s: NonNegativeFloat = 0.0  # seconds
    # 1-based step whose checkpoint pauses save_pause_s seconds after its shards are written and before
    # it is published (renamed into place), to kill a run mid-save and see the previous one resume.
    save_pause_at_step: PositiveInt | None = None
    save_pause_s: NonNegativeFloat = 0.0
    # checkpoint.async_save: the background writer of every save first sleeps this long while the
    # trainer goes on, so the snapshot a save writes is seen to be independent of later steps
    save_write_delay_s: NonNegativeFloat = 0.0
    # 1-based step whose first collective (in phase hang_phase when set) rank hang_rank never enters:
    # it sleeps there while the others wait, to see the watchdog's hang report (pretrain/forensics.py,
    # docs/failures.md). Needs train.watchdog_timeout_s > 0.
    hang_at_step: PositiveInt | None = None
    hang_rank: NonNegativeInt = 0
    hang_phase: WatchedPhase | None = None
    # 1-based step at which rank oom_rank raises torch.OutOfMemoryError in phase oom_phase, to see
    # the out-of-memory report (pretrain/oom.py) without a GPU; the error says the device holds
    # oom_device_gib GiB, the capacity the report's suggestion must fit in
    oom_at_step: PositiveInt | None = None
    oom_phase: Literal["forward_backward", "optimizer"] = "forward_backward"
    oom_rank: NonNegativeInt = 0
    oom_device_gib: PositiveFloat = 80.0


@dataclass(frozen=True)
class FaultInjection:
    """The `debug` section at work, for one rank."""

    cfg: DebugConfig
    rank: int

    @contextlib.contextmanager
    def around(self, step: int, chunks: list[Any], forward_step: Callable) -> Iterator[Callable]:
        """Around the forward/backward of training step `step` (0-based): the stall before it; the
        forward step it is to use (the NaN loss); after it, the NaN gradient on rank 0."""
        due = step + 1
        if self.cfg.stall_at_step == due:
            time.sleep(self.cfg.stall_s)
        yield partial(_with_nan_loss, forward_step) if self.cfg.nan_loss_at_step == due else forward_step
        if self.cfg.nan_grad_at_step == due and self.rank == 0:
            _poison_one_gradient(chunks)

    def save_pause_s(self, step: int) -> float:
        """Seconds the save of step `step` (1-based) waits between writing and publishing."""
        return self.cfg.save_pause_s if self.cfg.save_pause_at_step == step else 0.0

    @property
    def save_write_delay_s(self) -> float:
        return self.cfg.save_write_delay_s

    def out_of_memory(self, step: int, phase: str) -> None:
        """debug.oom_at_step: raises torch.OutOfMemoryError in phase `phase` of step `step` (1-based)."""
        raise_out_of_memory(self.cfg, self.rank, step, phase)


def _with_nan_loss(forward_step: Callable, data_iterator: Any, model: Any) -> tuple[Any, Callable]:
    """debug.nan_loss_at_step: the usual forward step, its loss multiplied by NaN."""
    output, loss = forward_step(data_iterator, model)
    return output, partial(_nan_loss, loss)


def _nan_loss(loss: Callable, output_tensor: Any) -> tuple[Any, Any, dict[str, Any]]:
    import torch

    loss_sum, num_tokens, reports = loss(output_tensor)
    nan_sum = torch.tensor([float("nan"), 1.0], device=loss_sum.device)  # [loss sum, token count]
    return loss_sum * float("nan"), num_tokens, {k: v * nan_sum for k, v in reports.items()}


def _poison_one_gradient(chunks: list[Any]) -> None:
    """debug.nan_grad_at_step: the first element of this rank's first gradient buffer becomes NaN."""
    buffer = chunks[0].buffers[0] if chunks[0].buffers else chunks[0].expert_parallel_buffers[0]
    buffer.grad_data[0] = float("nan")


def check_debug(debug: DebugConfig, watchdog_timeout_s: float) -> None:
    """The keys that need another section: the hang needs the watchdog (train.watchdog_timeout_s)."""
    if debug.hang_at_step is not None and not watchdog_timeout_s > 0:
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

"""Fault injection: the `debug` recipe section, to watch the fault guards work (tests, a new
cluster); never set in a real run. The step calls it through one hook (`FaultInjection.around`), the
checkpointer asks it how long to pause; with nothing set, neither changes anything.

A new fault is a `DebugConfig` key and a line in the hook (or a method the component that should
fail asks), plus a test that shows the guard it exercises catching it. Imports of torch stay inside
the functions: loading a recipe imports this module and stays free of torch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from common.schema import NonNegativeFloat, PositiveInt


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

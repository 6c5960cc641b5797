"""The `checkpoint` recipe section and the checkpointer: resume, when to save, background saves,
the save a preemption asks for. The files themselves are pretrain/checkpoint.py's (imported where
used: loading a recipe stays free of torch)."""

from __future__ import annotations

import pathlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from common.schema import NonNegativeInt, PositiveInt

if TYPE_CHECKING:
    from pretrain.guards import Watchdog
    from pretrain.recipe import DebugConfig


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
    # Distributed-optimizer state: fully_reshardable (resume at any layout; gathered per data-parallel
    # group when saving) | dp_reshardable (each rank's shard as is: faster, only the data-parallel size may change)
    # Before a load, check every file's CRC32 against the checkpoint's manifest (sizes are always
    # checked); the ranks split the reading. About 0.3 s per GiB per rank (docs/benchmarks.md).
    verify: bool = True
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores beside the model, optimizer and LR schedule."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # training samples read so far: the next step starts at this global index
    nonfinite_steps: int = 0  # steps skipped by the non-finite guard, resumes included


class Checkpointer:
    """Owns the run's checkpoints: what `checkpoint.load` resumes, saving every `interval` steps and
    at the end, background saves (published when written), and the save before a preemption stop."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        ckpt_dir: pathlib.Path,
        chunks: list[Any],
        optimizer: Any,
        scheduler: Any,
        extra: dict[str, Any],
        rank: int,
        debug: DebugConfig | None = None,
    ):
        self.cfg, self.dir = cfg, ckpt_dir
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.extra = extra  # saved with every checkpoint: the recipe, the vocabulary size
        self.rank = rank
        self.debug = debug  # fault injection: pauses and delays of saves
        self.async_queue: Any | None = None
        self.saved_at: int | None = None

    def resume(self, state: TrainState, global_batch_size: int) -> None:
        """Loads `checkpoint.load` into the model, optimizer, schedule and `state`; a fresh run
        refuses to write into a folder that already holds checkpoints."""
        from pretrain import checkpoint

        if self.cfg.load == "auto":
            path, skipped = checkpoint.choose_auto(self.dir, self.cfg.verify)
            if skipped:
                self._say(skipped, sys.stderr)
            if path is None:
                self._say(f"no checkpoint in {self.dir}: starting at step 0")
        else:
            path = checkpoint.resolve_load(self.cfg.load, self.dir, self.cfg.verify)
        if path is None:
            checkpoint.refuse_to_overwrite(self.cfg.load, self.dir)
            return
        saved = checkpoint.read_extra(path)
        checkpoint.check_same_model(path, self.chunks, saved, self.extra)
        extra = checkpoint.load(path, self.chunks, self.optimizer)
        if extra.get("kind") == "weights":  # e.g. converted from Hugging Face: a fresh run from these weights
            checkpoint.refuse_to_overwrite(None, self.dir)
            self._say(f"loaded weights from {path}; training starts at step 0")
            return
        self.scheduler.load_state_dict(extra["scheduler"])
        state.step = int(extra["step"])
        state.nonfinite_steps = int(extra.get("nonfinite_steps", 0))  # absent before the fault guards
        # Samples are addressed by global index: resuming at any data-parallel size continues at the
        # first sample the interrupted run had not trained on.
        state.consumed_samples = int(extra.get("consumed_samples", state.step * global_batch_size))
        self._say(f"resumed from {path} at step {state.step}")

    def after_step(self, state: TrainState, watchdog: Watchdog) -> None:
        """Publishes finished background saves; saves when `checkpoint.interval` says so."""
        from pretrain import checkpoint

        checkpoint.finish_async_saves(self.async_queue, blocking=False)
        if self.cfg.save and self.cfg.interval and state.step % self.cfg.interval == 0:
            with watchdog.phase(state.step, "checkpoint"):
                self.save(state)

    def at_end(self, state: TrainState, trained: bool, watchdog: Watchdog) -> None:
        """The final save (unless this step was just saved, or nothing was trained), then waits for
        every background save."""
        with watchdog.phase(state.step, "checkpoint"):
            if self.cfg.save and trained and self.saved_at != state.step:
                self.save(state)
            self.finish()

    def before_preemption_stop(self, state: TrainState, watchdog: Watchdog) -> str:
        """Saves the step every rank stopped after (unless just saved); says where it is."""
        from pretrain import checkpoint

        if not self.cfg.save:
            return "checkpoint.save = false: no checkpoint written"
        with watchdog.phase(state.step, "checkpoint"):
            if self.saved_at != state.step:
                self.save(state)
            self.finish()
        return f"saved {self.dir / checkpoint.checkpoint_name(state.step)}"

    def finish(self) -> None:
        """Waits for every background save and publishes it (collective)."""
        from pretrain import checkpoint

        checkpoint.finish_async_saves(self.async_queue, blocking=True)

    def save(self, state: TrainState) -> None:
        from pretrain import checkpoint

        if self.cfg.async_save and self.async_queue is None:
            self.async_queue = checkpoint.new_async_queue()
        extra = {
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "nonfinite_steps": state.nonfinite_steps,
            "scheduler": self.scheduler.state_dict(),
            **self.extra,
        }
        debug = self.debug
        pause = debug.save_pause_s if debug and debug.save_pause_at_step == state.step else 0.0
        path = checkpoint.save(
            self.dir,
            state.step,
            self.chunks,
            self.optimizer,
            extra,
            optimizer_format=self.cfg.optimizer_format,
            keep_last=self.cfg.keep_last,
            async_queue=self.async_queue,
            pause_before_publish_s=pause,
            write_delay_s=debug.save_write_delay_s if debug else 0.0,
        )
        background = " (writing in the background)" if self.cfg.async_save else ""
        self._say(f"saved checkpoint {path}{background}")
        self.saved_at = state.step

    def _say(self, line: str, stream: Any = None) -> None:
        if self.rank == 0:
            print(line, file=stream or sys.stdout, flush=True)

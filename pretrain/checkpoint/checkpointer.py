"""The checkpointer: resume, when to save, background saves, the save a preemption asks for. The
files themselves are storage.py's; the `checkpoint` recipe section is config.py's."""

from __future__ import annotations

import pathlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pretrain.checkpoint import compatibility, storage
from pretrain.checkpoint.config import CheckpointConfig

if TYPE_CHECKING:
    from pretrain.faults import FaultInjection
    from pretrain.guards import Watchdog


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
        faults: FaultInjection | None = None,
    ):
        self.cfg, self.dir = cfg, ckpt_dir
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.extra = extra  # saved with every checkpoint: the recipe, the vocabulary size
        self.rank = rank
        self.faults = faults  # the `debug` section: pauses and delays of saves
        self.async_queue: Any | None = None
        self.saved_at: int | None = None

    def resume(self, state: TrainState, global_batch_size: int) -> None:
        """Loads `checkpoint.load` into the model, optimizer, schedule and `state`; a fresh run
        refuses to write into a folder that already holds checkpoints."""
        if self.cfg.load == "auto":
            path, skipped = storage.choose_auto(self.dir, self.cfg.verify)
            if skipped:
                self._say(skipped, sys.stderr)
            if path is None:
                self._say(f"no checkpoint in {self.dir}: starting at step 0")
        else:
            path = storage.resolve_load(self.cfg.load, self.dir, self.cfg.verify)
        if path is None:
            storage.refuse_to_overwrite(self.cfg.load, self.dir)
            return
        saved = storage.read_extra(path)
        compatibility.check_same_model(path, self.chunks, saved, self.extra)
        extra = storage.load(path, self.chunks, self.optimizer)
        if extra.get("kind") == "weights":  # e.g. converted from Hugging Face: a fresh run from these weights
            storage.refuse_to_overwrite(None, self.dir)
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
        storage.finish_async_saves(self.async_queue, blocking=False)
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
        if not self.cfg.save:
            return "checkpoint.save = false: no checkpoint written"
        with watchdog.phase(state.step, "checkpoint"):
            if self.saved_at != state.step:
                self.save(state)
            self.finish()
        return f"saved {self.dir / storage.checkpoint_name(state.step)}"

    def finish(self) -> None:
        """Waits for every background save and publishes it (collective)."""
        storage.finish_async_saves(self.async_queue, blocking=True)

    def save(self, state: TrainState) -> None:
        if self.cfg.async_save and self.async_queue is None:
            self.async_queue = storage.new_async_queue()
        extra = {
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "nonfinite_steps": state.nonfinite_steps,
            "scheduler": self.scheduler.state_dict(),
            **self.extra,
        }
        faults = self.faults
        path = storage.save(
            self.dir,
            state.step,
            self.chunks,
            self.optimizer,
            extra,
            optimizer_format=self.cfg.optimizer_format,
            keep_last=self.cfg.keep_last,
            async_queue=self.async_queue,
            pause_before_publish_s=faults.save_pause_s(state.step) if faults else 0.0,
            write_delay_s=faults.save_write_delay_s if faults else 0.0,
        )
        background = " (writing in the background)" if self.cfg.async_save else ""
        self._say(f"saved checkpoint {path}{background}")
        self.saved_at = state.step

    def _say(self, line: str, stream: Any = None) -> None:
        if self.rank == 0:
            print(line, file=stream or sys.stdout, flush=True)

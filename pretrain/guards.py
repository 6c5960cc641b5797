"""Fault guards of the training loop: preemption signals, non-finite steps and a stall watchdog."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any, TextIO

import torch
import torch.distributed as dist

from common.errors import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED, RunStopped

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Every signal that asks the run to stop after the current step and save: a preemption, or Ctrl-C.
STOP_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)


class Preempted(RunStopped):
    """A preemption signal stopped the run after a step all ranks agreed on, and a checkpoint."""

    exit_code = EXIT_PREEMPTED
    label = "stopped"


class Interrupted(Preempted):
    """Ctrl-C (SIGINT) stopped the run the way a preemption does, with the shells' exit code for it."""

    exit_code = EXIT_INTERRUPTED
    label = "interrupted"


class NonfiniteStop(RunStopped):
    """A step's loss or gradients were not finite and the recipe says stop (or skipped too many)."""

    exit_code = EXIT_NONFINITE


class StopRequest:
    """Remembers the first stop signal this process received (a preemption, or the first Ctrl-C);
    the loop decides when to stop. A second Ctrl-C ends the process at once (`SecondInterrupt`).

    The handler only records: a print there could interrupt a print of the main thread."""

    def __init__(self, rank: int = 0) -> None:
        self.signal: int | None = None
        self.rank = rank
        self.step = 0  # the step (1-based) the loop is in; 0 = before the first; set by the loop

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def interrupted(self) -> bool:
        """The first stop signal was Ctrl-C (SIGINT)."""
        return self.signal == signal.SIGINT

    def second_interrupt_line(self) -> str | None:
        """What rank 0 prints when a second Ctrl-C ends the process; the other ranks print nothing."""
        if self.rank != 0:
            return None
        where = f"during step {self.step}" if self.step else "before the first step"
        return (
            f"interrupted: second Ctrl-C, stopped at once {where} without saving it; "
            f"checkpoint.load=auto resumes from the last checkpoint (exit code {EXIT_INTERRUPTED})"
        )

    @contextlib.contextmanager
    def installed(self, signals: Sequence[int] = STOP_SIGNALS) -> Iterator[StopRequest]:
        """Handles `signals` while the block runs; the previous handlers come back after it. With
        SIGINT among them, a second Ctrl-C ends the process at once."""
        previous = {s: signal.signal(s, self._handle) for s in signals}
        second = SecondInterrupt(self.second_interrupt_line) if signal.SIGINT in signals else None
        try:
            if second is not None:
                second.start()
            yield self
        finally:
            if second is not None:
                second.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)


class SecondInterrupt:
    """Ends the process with EXIT_INTERRUPTED on the second SIGINT, after one line (`line()`, None =
    silent), even while the main thread waits in a collective that never returns.

    Python runs signal handlers in the main thread only, between bytecodes: a rank blocked in a gloo
    or NCCL call would never see the second Ctrl-C there. The interpreter's C-level handler also
    writes each signal's number to the wakeup fd at once; a thread reading it counts the SIGINTs.
    Processes forked meanwhile (data-loader workers, background checkpoint writers) ignore SIGINT
    and leave the pipe alone: the terminal sends Ctrl-C to them too, and this process stops them."""

    def __init__(self, line: Callable[[], str | None]) -> None:
        self.line = line
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = -1
        self._thread = threading.Thread(target=self._watch, name="pretrain-second-interrupt", daemon=True)
        self._active = False

    def start(self) -> None:
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._active = True
        os.register_at_fork(after_in_child=self._in_child)
        self._thread.start()

    def stop(self) -> None:
        self._active = False
        signal.set_wakeup_fd(self._previous_fd)
        os.write(self._write, b"\0")  # wakes the thread, which sees it is no longer active
        self._thread.join()
        os.close(self._write)
        os.close(self._read)

    def _in_child(self) -> None:
        if self._active:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.close(self._read)
            os.close(self._write)

    def _watch(self) -> None:
        seen = 0
        while self._active:
            seen += os.read(self._read, 64).count(signal.SIGINT)
            if seen >= 2:
                line = self.line()
                if line is not None:
                    print(line, file=sys.stderr, flush=True)
                os._exit(EXIT_INTERRUPTED)


def agree(flags: Sequence[bool], device: torch.device) -> list:
    """Logical OR of each flag over every rank (one small all-reduce): all ranks get the same answers,
    so they skip or stop at the same step."""
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def grads_are_finite(chunks: Sequence[Any]) -> bool:
    """This rank's gradients (parallel.data_parallel.local_gradients) hold only finite values.

    A sum per buffer, not an element-wise test: no temporary as large as the gradients, and NaN or
    ±inf anywhere makes the sum non-finite. With the distributed optimizer each rank checks its whole
    buffer (its own reduced shard and its local gradients of the others); fully sharded, its shard of
    the reduced gradients, where a fault on any rank has arrived through the reduce-scatter. Either
    way a fault on any rank shows up after `agree`."""
    from parallel.data_parallel import local_gradients

    return all(math.isfinite(float(grad.sum())) for grad in local_gradients(chunks))


class NonfiniteGuard:
    """Counts steps with a non-finite loss or gradient and says when the run must stop instead."""

    def __init__(self, mode: str, max_skipped: int, skipped: int = 0) -> None:
        self.mode, self.max_skipped, self.skipped = mode, max_skipped, skipped

    def count(self, step: int, loss: float) -> str | None:
        """Records step `step` (1-based) as not applied; returns why the run must stop, or None."""
        what = f"non-finite loss or gradients at step {step} (loss {loss}), the model was not updated"
        if self.mode == "stop":
            return f"{what}; stopping (train.on_nonfinite = stop)"
        self.skipped += 1
        if self.skipped > self.max_skipped:
            return (
                f"{what}; {self.skipped} steps skipped, more than train.max_skipped_steps = "
                f"{self.max_skipped}: stopping"
            )
        return None

    def warning(self, step: int, loss: float) -> str:
        return (
            f"warning: non-finite loss or gradients at step {step} (loss {loss}): step skipped, "
            f"{self.skipped} of at most {self.max_skipped} (train.max_skipped_steps)"
        )


@dataclasses.dataclass
class Guards:
    """What the loop consults each step: a preemption request, the non-finite guard, the watchdog."""

    stop: StopRequest
    nonfinite: NonfiniteGuard
    watchdog: Watchdog


class Watchdog:
    """A thread that reports a phase of the loop running longer than `timeout_s`: one line with rank,
    step, phase and elapsed time, repeated every `timeout_s`; with a `report` (pretrain/forensics.py)
    also the hang report: the collectives each rank is in, which ranks never entered them, every
    thread's stack in a file per rank. It only reports; the run goes on. `timeout_s = 0` starts no
    thread and `phase` costs nothing."""

    def __init__(self, rank: int, timeout_s: float, stream: TextIO = sys.stderr, report: Any = None) -> None:
        self.rank, self.timeout_s, self.stream, self.report = rank, timeout_s, stream, report
        self._lock = threading.Lock()
        self._current: tuple | None = None  # (step, phase, start, next report at)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recording: contextlib.ExitStack | None = None
        self._reporting = report is not None  # False once the store failed

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            if self.report is not None:  # the collectives are recorded while the watchdog runs
                self._recording = contextlib.ExitStack()
                self._recording.enter_context(self.report.ring.installed())
            self._thread = threading.Thread(target=self._watch, name="pretrain-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._recording is not None:
            self._recording.close()

    @contextlib.contextmanager
    def phase(self, step: int, name: str) -> Iterator[None]:
        """Marks the block as phase `name` of step `step` (1-based)."""
        if self._thread is None:
            yield
            return
        if self.report is not None:
            self.report.ring.step, self.report.ring.phase = step, name
        start = time.monotonic()
        with self._lock:
            self._current = (step, name, start, start + self.timeout_s)
        try:
            yield
        finally:
            with self._lock:
                self._current = None

    def _watch(self) -> None:
        poll = min(self.timeout_s / 4, 1.0)
        while not self._stop.wait(poll):
            with self._lock:
                current = self._current
            if current is not None and time.monotonic() >= current[3]:
                step, name, start, next_report = current
                with self._lock:
                    if self._current is current:
                        self._current = (step, name, start, next_report + self.timeout_s)
                self._report(step, name, time.monotonic() - start, first=next_report == start + self.timeout_s)
            self._answer(current)

    def _report(self, step: int, name: str, elapsed: float, first: bool) -> None:
        where = f"; details in {self.report.out_dir}" if self.report is not None else "; Python stacks follow"
        print(
            f"watchdog: rank {self.rank} step {step} phase {name} running for {elapsed:.1f} s "
            f"(train.watchdog_timeout_s = {self.timeout_s:g}){where}",
            file=self.stream,
            flush=True,
        )
        if self.report is None:
            faulthandler.dump_traceback(file=self.stream, all_threads=True)
        elif first and self._reporting:
            self._use_report(lambda: self.report.overran(step, name))

    def _answer(self, current: tuple | None) -> None:
        """Answers a hang-report round another rank (or this one) asked for."""
        if not self._reporting:
            return
        step, name, start = current[:3] if current else (self.report.ring.step, "between phases", time.monotonic())
        state = {"step": step, "phase": name, "elapsed": time.monotonic() - start}
        self._use_report(lambda: self.report.poll(state))

    def _use_report(self, call: Callable[[], None]) -> None:
        """The store may be gone (rank 0's process ended): one line, and no more reports."""
        try:
            call()
        except (RuntimeError, OSError) as e:
            print(f"watchdog: rank {self.rank}: no hang report, the c10d store failed: {e}", file=self.stream)
            self._reporting = False

"""Seeing into a run: the `train.profile` section (torch.profiler traces and CUDA memory snapshots of
chosen steps and ranks) and the peak memory of a piece of work, for the benchmarks."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.errors import RecipeError
from common.files import set_aside
from common.schema import NonNegativeInt, PositiveInt

if TYPE_CHECKING:  # imported where used: loading a recipe stays free of torch
    import torch


@dataclass
class ProfileConfig:
    """Profile steps start_step..end_step (1-based, inclusive) on `ranks`; null start_step = off."""

    start_step: PositiveInt | None = None
    end_step: PositiveInt | None = None  # null = start_step (one step)
    ranks: list[NonNegativeInt] = field(default_factory=lambda: [0])  # global ranks that profile
    # also record memory: allocations in the trace, and on GPUs a CUDA memory snapshot of the steps
    memory: bool = False

    def check(self) -> None:
        if self.end_step is not None and self.start_step is None:
            raise RecipeError("train.profile.end_step needs train.profile.start_step")
        if self.start_step is not None and self.end_step is not None and self.end_step < self.start_step:
            raise RecipeError(
                f"train.profile.end_step = {self.end_step} is before train.profile.start_step = {self.start_step}"
            )
        if self.start_step is not None and not self.ranks:
            raise RecipeError("train.profile.ranks is empty: name the ranks to profile (e.g. [0])")


class Profiler:
    """Runs torch.profiler around this rank's profiled steps and writes, under <logging.dir>/profile/:
    trace_rank<R>.json (Chrome trace format: open it in https://ui.perfetto.dev) and, with
    `memory` on a GPU, memory_rank<R>.pickle (open it in https://pytorch.org/memory_viz)."""

    def __init__(self, cfg: ProfileConfig, rank: int, log_dir: pathlib.Path, device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.dir = log_dir / "profile"
        self.enabled = cfg.start_step is not None and rank in cfg.ranks
        self.last = cfg.end_step or cfg.start_step
        self._profile: Any = None
        self._step: Any = None

    def before_step(self, step: int) -> None:
        """Called before step `step` (1-based) runs."""
        if not self.enabled or self.cfg.start_step is None or not self.cfg.start_step <= step <= (self.last or 0):
            return
        if self._profile is None:
            self._start()
        self._step = _record(f"train_step {step}")
        self._step.__enter__()

    def after_step(self, step: int) -> None:
        """Called once step `step` has finished (logged, and saved if it was due)."""
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None
        if self._profile is not None and step == self.last:
            self.close()

    def close(self) -> None:
        """Stops and writes what was recorded (also when the run ends before end_step)."""
        if self._profile is None:
            return
        import torch

        profile, self._profile = self._profile, None
        profile.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"trace_rank{self.rank}.json"
        snapshot = self.dir / f"memory_rank{self.rank}.pickle"
        memory = self.cfg.memory and self.device.type == "cuda"
        for earlier in (trace, snapshot) if memory else (trace,):  # a restart profiling again keeps them
            if earlier.exists():
                print(f"{earlier} exists: the earlier one is kept as {set_aside(earlier)}", flush=True)
        profile.export_chrome_trace(str(trace))
        written = [trace]
        if memory:
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        print(f"profile of rank {self.rank}: {', '.join(str(p) for p in written)}", flush=True)

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.cfg.memory and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self._profile = profile(
            activities=activities, record_shapes=True, profile_memory=self.cfg.memory, with_stack=False
        )
        self._profile.start()


def _record(name: str) -> Any:
    from torch.profiler import record_function

    return record_function(name)


# ---------------------------------------------------------------------------------------- benchmarks


def _cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Most MiB live in torch's CPU allocator while fn runs, from the profiler's memory events.

    Only this thread's events are recorded: a tensor a communication thread frees (gloo's workers
    drop the last reference to a collective's buffers) stays live here, so with several processes
    this overstates the peak; `cpu_allocator_peak_mib` does not have that blind spot."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:  # frees of blocks allocated before fn are not reported
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Most MiB live in torch's allocator while fn runs, beyond what was live before it:
    `torch.cuda.max_memory_allocated` on a GPU, the profiler's allocation events on the CPU."""
    import torch

    if device.type != "cuda":
        return _cpu_peak_mib(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def count_cpu_allocations_on_every_thread() -> None:
    """Makes torch's CPU allocator keep one count of live bytes over every thread (c10's flag
    `caffe2_report_cpu_memory_usage`), which each allocation event then reports. Call it before
    the tensors to be counted exist: blocks allocated earlier are unknown to the count."""
    import ctypes

    import torch

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def cpu_allocator_peak_mib(fn: Callable[[], object]) -> tuple[float, float]:
    """(MiB live in torch's CPU allocator when fn starts, most MiB live while it runs), counted over
    every thread: the profiler's allocation events carry the allocator's running total, which with
    `count_cpu_allocations_on_every_thread` also drops when a communication thread frees a block."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.empty(1)  # an allocation event at the start, to read the total from
        fn()
    totals = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag.name == "Allocation" and node.extra_fields.device.type == "cpu":
            totals.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    totals.sort()
    if not totals:
        raise RuntimeError("no allocation events: was count_cpu_allocations_on_every_thread() called first?")
    _, size, total = totals[0]
    return (total - size) / 2**20, max(t for _, _, t in totals) / 2**20

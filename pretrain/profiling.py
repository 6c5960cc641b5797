"""Measuring a run: the peak memory of a piece of work on the CPU or a GPU."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


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

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def cpu_allocator_peak_mib(fn: Callable[[], object]) -> tuple[float, float]:
    """(MiB live in torch's CPU allocator when fn starts, most MiB live while it runs), counted over
    every thread: the profiler's allocation events carry the allocator's running total, which with
    `count_cpu_allocations_on_every_thread` also drops when a communication thread frees a block."""
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

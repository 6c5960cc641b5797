"""Measuring a run: the peak memory of a piece of work on the CPU or a GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _cpu_peak_mib(fn: Callable[[], object]) -> float:
    """Most MiB live in torch's CPU allocator while fn runs, from the profiler's memory events."""
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

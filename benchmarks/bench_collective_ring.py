"""Per-step cost of the hang forensics' collective ring (pretrain/forensics.py): what one wrapped
torch.distributed call costs beyond the call itself, times the calls a training step makes, next to
the whole step; and whole steps with and without the ring, alternated, in one process:

    torchrun --nproc_per_node=N -m benchmarks.bench_collective_ring --recipe tiny_gpt data.path=PREFIX \
        [parallel.tensor=2 ...] [--iters 20]
"""

import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.common import recipe_arguments, stepped_run
from pretrain.forensics import CollectiveRing


def _no_op(tensor, op=None, group=None, async_op=False):  # all_reduce's signature, no communication
    return None


def _per_call_us(ring: CollectiveRing, calls: int) -> tuple[float, float]:
    """Median µs of a call with all_reduce's arguments (a [4096, 8] tensor, the world group) plain and
    through the ring's wrapper, without the communication, whose time a loaded machine makes noise of
    (7 rounds each, alternated)."""
    tensor = torch.zeros(4096, 8)
    wrapper = ring._wrap("all_reduce", _no_op)
    plain: list[float] = []
    wrapped: list[float] = []
    for _ in range(7):
        for times, fn in ((plain, _no_op), (wrapped, wrapper)):
            start = time.perf_counter()
            for _ in range(calls):
                fn(tensor, group=None)
            times.append(1e6 * (time.perf_counter() - start) / calls)
    return statistics.median(plain), statistics.median(wrapped)


def main() -> None:
    args = recipe_arguments(iters=20)
    _, train_step = stepped_run(args, port=29534)
    ring = CollectiveRing(dist.get_rank())
    train_step()  # warm-up
    with ring.installed():
        train_step()
    calls_per_step = sum(ring.counts.values())
    plain, wrapped = [], []
    for _ in range(args.iters):  # alternated, so the machine's load falls on both alike
        plain.append(train_step())
        with ring.installed():
            wrapped.append(train_step())
    raw_us, ring_us = _per_call_us(ring, 20000)
    step_ms = statistics.median(plain)
    overhead_ms = calls_per_step * (ring_us - raw_us) / 1000
    if dist.get_rank() == 0:
        print(
            f"{calls_per_step} collectives per step on rank 0; a call {raw_us:.2f} µs plain, "
            f"{ring_us:.2f} µs recorded (+{ring_us - raw_us:.2f} µs); step {step_ms:.1f} ms plain, "
            f"{statistics.median(wrapped):.1f} ms recorded (medians of {args.iters}, alternated); "
            f"ring cost {overhead_ms:.3f} ms per step = {100 * overhead_ms / step_ms:.2f} %"
        )


if __name__ == "__main__":
    main()

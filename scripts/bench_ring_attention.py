"""Benchmark: ring attention's peak memory and time per rank at a context-parallel size.

    python scripts/bench_ring_attention.py --seq 8192                       # CP = 1
    torchrun --standalone --nproc_per_node=4 scripts/bench_ring_attention.py --seq 8192   # CP = 4

Each rank holds its load-balanced S/cp slice of q, k, v and runs forward + backward of one causal
attention over the whole sequence. Reported per rank: the growth of the process's peak RSS over
the attention (inputs, outputs, gradients and every buffer the ring or the kernels allocate) and
the best wall time. Rank 0 prints the largest value over ranks.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _attend(b: int, heads: int, groups: int, local: int, head_dim: int) -> float:
    """Forward + backward of ring attention on fresh local inputs; returns the wall seconds."""
    import torch
    import torch.distributed as dist

    from model.ring_attention import RingAttentionFunction

    q = torch.randn(b, heads, local, head_dim, requires_grad=True)  # [b, np, s/cp, hn]
    k = torch.randn(b, groups, local, head_dim, requires_grad=True)  # [b, ng, s/cp, hn]
    v = torch.randn(b, groups, local, head_dim, requires_grad=True)
    dist.barrier()
    start = time.perf_counter()
    RingAttentionFunction.apply(q, k, v, dist.group.WORLD, head_dim ** -0.5).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cp = dist.get_world_size()
    local = args.seq // cp
    # A tiny call first, so one-time costs (kernel libraries, thread pools, communication buffers)
    # are in the baseline and not counted as attention memory.
    _attend(1, args.heads, args.groups, 2 * cp, args.head_dim)
    base = _peak_mib()
    times = []
    for _ in range(args.iters + 1):
        times.append(_attend(1, args.heads, args.groups, local, args.head_dim))
    stats = torch.tensor([_peak_mib() - base, min(times[1:])], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(f"cp={cp} seq={args.seq} heads={args.heads}/{args.groups} hn={args.head_dim}: "
              f"attention peak memory per rank {stats[0]:.0f} MiB, fwd+bwd {stats[1]:.2f} s (max over ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Benchmark: the ring (p2p), Ulysses (a2a) and a2a+p2p attentions side by side at one context-parallel size.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.bench_context_comm --seq 8192   # p2p, a2a
    torchrun --standalone --nproc_per_node=4 -m benchmarks.bench_context_comm --seq 8192   # p2p, a2a, a2a 2 x p2p 2

On GPUs (NCCL, one rank per GPU): add `--device cuda --dtype bf16`.

Each rank holds its load-balanced S/cp slice of q, k, v and of the output gradient in a model's
[s, b, h, d] layout and runs forward + backward of one causal attention over the whole sequence,
as one layer's core attention does in training. Per rank, largest over ranks:

- bytes sent: counted at every isend and all_to_all_single during one call (an all-to-all's own
  share stays on the rank and is not counted), beside the formula (`bytes_formula`);
- peak attention memory: the most bytes live in torch's allocator during one call, inputs and
  gradients included (pretrain/profiling.py:peak_mib);
- time: the median of `--iters` rounds, each round running every method once in turn (A B C A B C …),
  so that ratios compare the same moments of a shared machine.

a2a+p2p uses all-to-all groups of `--a2a` consecutive ranks and the ring across them (megatron-core's
hierarchical context-parallel groups, made here by hand in the same order).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.common import seconds
from pretrain.profiling import peak_mib

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def bytes_formula(comm: str, seq: int, b: int, h: int, g: int, d: int, e: int, cp: int, a2a: int) -> int:
    """Bytes one rank sends for one layer's core attention, forward + backward.

    s/cp rows per rank, h query and g K/V heads of size d, e bytes per element; dK/dV travel in fp32.
    Ring over r ranks on rows x heads g: forward K, V (r−1 hops), backward K, V again (r−1 hops)
    and their fp32 gradients (r hops). All-to-all over n ranks sends (n−1)/n of what it moves:
    q, k, v forward and the output back, their mirrors backward; K/V heads copied to n when g < n.
    """
    rows = seq // cp
    if comm == "p2p":
        return _ring_bytes(rows * b * g * d, e, cp)
    n = cp if comm == "a2a" else a2a
    kv_heads = max(g, n)  # fewer K/V heads than ranks are copied before the all-to-all
    moved = rows * b * d * (2 * h + 2 * kv_heads)  # forward: q, k, v out, output back; backward: the same
    sent = 2 * moved * (n - 1) // n * e
    if comm == "a2a+p2p":  # the ring across cp/n groups, on the group's rows and 1/n of the K/V heads
        sent += _ring_bytes(rows * n * b * (kv_heads // n) * d, e, cp // n)
    return sent


def _ring_bytes(kv_elements: int, e: int, ring: int) -> int:
    if ring == 1:
        return 0
    return 2 * kv_elements * (ring - 1) * e * 2 + 2 * kv_elements * ring * 4


class _ByteCounter:
    """Counts what isend and all_to_all_single send to other ranks while active."""

    def __init__(self) -> None:
        self.sent = 0

    def __enter__(self) -> _ByteCounter:
        import torch.distributed as dist

        self._isend, self._a2a = dist.isend, dist.all_to_all_single

        def isend(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            self.sent += tensor.numel() * tensor.element_size()
            return self._isend(tensor, *args, **kwargs)

        def all_to_all_single(
            output: Any,
            input: Any,
            output_split_sizes: Any = None,
            input_split_sizes: Any = None,
            group: Any = None,
            async_op: bool = False,
        ) -> Any:
            assert input_split_sizes is None  # equal splits: (n − 1)/n of the input leaves the rank
            n = dist.get_world_size(group)
            self.sent += input.numel() * input.element_size() * (n - 1) // n
            return self._a2a(output, input, output_split_sizes, input_split_sizes, group, async_op)

        dist.isend, dist.all_to_all_single = isend, all_to_all_single
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        dist.isend, dist.all_to_all_single = self._isend, self._a2a


def _methods(args: argparse.Namespace, cp: int, rank: int) -> dict[str, tuple]:
    """name -> (comm, all-to-all group, ring group); every rank creates every group, in one order."""
    import torch.distributed as dist

    world = dist.group.WORLD
    methods: dict[str, tuple] = {"p2p (ring)": ("p2p", None, world), f"a2a {cp}": ("a2a", world, None)}
    if 1 < args.a2a < cp and cp % args.a2a == 0:
        n = args.a2a
        a2a_groups = [dist.new_group(list(range(i, i + n))) for i in range(0, cp, n)]
        ring_groups = [dist.new_group(list(range(u, cp, n))) for u in range(n)]
        methods[f"a2a {n} x p2p {cp // n}"] = ("a2a+p2p", a2a_groups[rank // n], ring_groups[rank % n])
    return methods


def _make_call(args: argparse.Namespace, method: tuple, rows: int, device: Any, dtype: Any) -> Callable[[], Any]:
    """Forward + backward of one method's attention on fresh inputs ([s/cp, b, h, d] leaves)."""
    import torch

    from model.attention.ring import RingAttentionFunction
    from model.attention.ulysses import ulysses_attention

    comm, a2a_group, ring_group = method
    draw = lambda heads, grad: torch.randn(
        rows, 1, heads, args.head_dim, device=device, dtype=dtype, requires_grad=grad
    )
    q, k, v, dout = draw(args.heads, True), draw(args.groups, True), draw(args.groups, True), draw(args.heads, False)
    scale = args.head_dim**-0.5
    if comm == "p2p":
        bhsd = lambda t: t.permute(1, 2, 0, 3)  # [s, b, h, d] seen as [b, h, s, d]
        return lambda: RingAttentionFunction.apply(bhsd(q), bhsd(k), bhsd(v), ring_group, scale).backward(bhsd(dout))
    return lambda: ulysses_attention(q, k, v, a2a_group, ring_group, scale).backward(dout)


def _run_fresh(args: argparse.Namespace, method: tuple, rows: int, device: Any, dtype: Any) -> None:
    """One call on inputs allocated inside it: what peak_mib measures counts them."""
    _make_call(args, method, rows, device, dtype)()


def _synchronized(device: Any) -> Callable[[Callable[[], Any]], float]:
    import torch.distributed as dist

    def timed(fn: Callable[[], Any]) -> float:
        dist.barrier()
        return seconds(fn, device)

    return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--a2a", type=int, default=2, help="all-to-all group size of a2a+p2p")
    parser.add_argument("--iters", type=int, default=3, help="rounds of every method in turn")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    dtype = getattr(torch, DTYPES[args.dtype])
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    rows = args.seq // cp
    methods = _methods(args, cp, rank)
    calls = {name: _make_call(args, method, rows, device, dtype) for name, method in methods.items()}
    figures: dict[str, list[float]] = {}
    for name, call in calls.items():
        call()  # warm-up: kernel choice and its probe
        fresh = functools.partial(_run_fresh, args, methods[name], rows, device, dtype)
        with _ByteCounter() as counter:
            memory = peak_mib(fresh, device)
        figures[name] = [float(counter.sent), memory]
    timed, times = _synchronized(device), {name: list[float]() for name in calls}
    for _ in range(args.iters):
        for name, call in calls.items():
            times[name].append(timed(call))
    stats = torch.tensor([[*figures[n], statistics.median(times[n])] for n in calls], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        _report(args, cp, list(calls), methods, stats.tolist(), dtype)
    dist.destroy_process_group()


def _report(args: argparse.Namespace, cp: int, names: list, methods: dict, rows: list, dtype: Any) -> None:
    e = dtype.itemsize
    print(
        f"cp={cp} seq={args.seq} heads={args.heads}/{args.groups} hn={args.head_dim} {args.dtype}, batch 1, "
        f"forward + backward of one causal attention; per rank, largest over ranks; {args.iters} rounds"
    )
    ring_sent, ring_memory, ring_time = rows[0]
    print(
        "| method | MiB sent (counted) | MiB sent (formula) | peak MiB | median ms | sent / ring | memory / ring | time / ring |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (sent, memory, median) in zip(names, rows):
        comm = methods[name][0]
        formula = bytes_formula(comm, args.seq, 1, args.heads, args.groups, args.head_dim, e, cp, args.a2a)
        print(
            f"| {name} | {sent / 2**20:.1f} | {formula / 2**20:.1f} | {memory:.0f} | {median * 1e3:.0f} | "
            f"{sent / ring_sent:.2f} | {memory / ring_memory:.2f} | {median / ring_time:.2f} |"
        )


if __name__ == "__main__":
    main()

"""Benchmark: ring attention's peak memory and time per rank at a context-parallel size.

CPU (gloo; peak allocated memory and wall time):

    python -m benchmarks.bench_ring_attention --seq 8192                                      # CP = 1
    torchrun --standalone --nproc_per_node=4 -m benchmarks.bench_ring_attention --seq 8192   # CP = 4

GPU (NCCL across GPUs; CUDA-event time and peak allocated memory), with a reference row: one
attention call on the whole sequence (flash-attn when installed, else torch's flash SDPA kernel):

    torchrun --standalone --nproc_per_node=2 -m benchmarks.bench_ring_attention --device cuda --dtype bf16

One GPU cannot hold two NCCL ranks, so `--simulate-cp N` runs every rank of a CP = N ring in turn in
one process over a no-op process group: the blocks each rank computes are exact, no bytes move.
That is the ring's compute per rank; on NVLink its transfers overlap the next block's compute.

    python -m benchmarks.bench_ring_attention --device cuda --dtype bf16 --simulate-cp 2 --seq 32768

Each rank holds its load-balanced S/cp slice of q, k, v and of the output gradient, in a model's
layout ([s, b, h, d] tensors seen as [b, h, s, d], as megatron's attention passes them), and runs
forward + backward of one causal attention over the whole sequence. Rank 0 prints the largest value
over ranks.

`--reference` measures instead what a CP = 1 layer runs (model/attention/sdpa.py:SDPAttention): one
`F.scaled_dot_product_attention` call over the whole sequence (on a GPU, flash-attn's when installed).

Peak memory is the most bytes live in torch's allocator during one call, counting the inputs, the
output gradient, the output, the input gradients and every buffer and kernel workspace: on a GPU
`torch.cuda.max_memory_allocated`, on the CPU the profiler's allocation events (exact, and free of
what malloc keeps after a free, which made the process's RSS creep from run to run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from pretrain.profiling import peak_mib

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class _Timer:
    """Wall time of a callable: CUDA events on a GPU (after a synchronize), perf_counter on CPU."""

    def __init__(self, device: Any):
        self.device = device

    def __call__(self, fn: Any) -> float:
        import torch

        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return begin.elapsed_time(end) / 1000


def _inputs(args: argparse.Namespace, local: int, device: Any, dtype: Any) -> tuple[Any, ...]:
    """q, k, v and the output gradient: [s, b, h, d] tensors (q, k, v leaves) seen as [b, h, s, d]."""
    import torch

    def draw(heads: int, grad: bool) -> Any:
        t = torch.randn(local, 1, heads, args.head_dim, device=device, dtype=dtype, requires_grad=grad)
        return t.permute(1, 2, 0, 3)

    return draw(args.heads, True), draw(args.groups, True), draw(args.groups, True), draw(args.heads, False)


def _ring_call(args: argparse.Namespace, local: int, device: Any, dtype: Any, group: Any) -> Any:
    """Forward + backward of ring attention on fresh local inputs."""
    from model.attention.ring import RingAttentionFunction

    q, k, v, dout = _inputs(args, local, device, dtype)
    return lambda: RingAttentionFunction.apply(q, k, v, group, args.head_dim**-0.5).backward(dout)


def _full_sequence_call(args, device, dtype):
    """(name, factory of a callable): forward + backward of one causal attention call over the whole
    sequence: flash-attn's when installed on a GPU, else torch SDPA (its flash kernel on a GPU)."""
    import torch.nn.functional as F

    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    if device.type != "cuda":
        flash_attn_func = None

    def make():
        q, k, v, dout = _inputs(args, args.seq, device, dtype)
        if flash_attn_func is not None:  # [b, s, heads, hn]: the same memory (b = 1)
            qt, kt, vt, dt = (t.transpose(1, 2) for t in (q, k, v, dout))
            return lambda: flash_attn_func(qt, kt, vt, causal=True).backward(dt)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if device.type != "cuda":  # what SDPAttention runs at CP = 1
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout)
        # the flash kernel on K/V copied per query head: same FLOPs, and no doubt whether this torch
        # version's flash path takes grouped K/V
        rep = args.heads // args.groups
        ke, ve = (t.detach().repeat_interleave(rep, dim=1).requires_grad_() for t in (k, v))

        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, ke, ve, is_causal=True).backward(dout)

        return call

    if flash_attn_func is not None:
        return "flash-attn", make
    return ("torch SDPA flash (K/V per query head)" if device.type == "cuda" else "torch SDPA"), make


def _measure(make_call: Any, iters: int, timer: Any, device: Any) -> tuple:
    """(best and median seconds of `iters` runs after one warm-up, peak memory in MiB of one run
    counting its inputs, output gradient and everything the call allocates)."""
    call = make_call()
    call()  # warm-up: kernel choice and its probe, communication buffers
    memory = peak_mib(lambda: make_call()(), device)  # fresh inputs, allocated while measured
    times = [timer(call) for _ in range(iters)]
    return min(times), statistics.median(times), memory


def _init_group(args, device):
    import torch.distributed as dist

    if args.simulate_cp:
        return  # per simulated rank, in _simulate
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _simulate(args: argparse.Namespace, device: Any, dtype: Any, timer: Any) -> list:
    """One rank after the other of a CP = simulate_cp ring over a no-op ('fake') process group.

    Its receives fill nothing, so each receive buffer gets a copy of what the rank sends: the
    blocks then compute on real values, not on uninitialized memory (whose NaNs or denormals could
    change a kernel's speed). That is one device copy per hop which the real ring does not make."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model.attention import ring as ring_attention

    shift = ring_attention._Ring.shift

    def shift_with_data(ring, tensors, tags):
        transfer = shift(ring, tensors, tags)
        for sent, buffer in zip(tensors, transfer.incoming):
            buffer.copy_(sent)
        return transfer

    cp, rows = args.simulate_cp, []
    ring_attention._Ring.shift = shift_with_data  # type: ignore[method-assign]
    try:
        for rank in range(cp):
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=cp)
            rows.append(
                _measure(
                    lambda: _ring_call(args, args.seq // cp, device, dtype, dist.group.WORLD), args.iters, timer, device
                )
            )
            dist.destroy_process_group()
    finally:
        ring_attention._Ring.shift = shift  # type: ignore[method-assign]
    return rows


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--simulate-cp",
        type=int,
        default=0,
        help="run the N ranks of a CP ring one after the other in this process (one GPU)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="measure one whole-sequence SDPA call (what CP = 1 runs) instead of the ring",
    )
    return parser.parse_args()


def main() -> None:
    args = _parse_args()

    import torch
    import torch.distributed as dist

    dtype = getattr(torch, DTYPES[args.dtype])
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timer = _Timer(device)
    if args.reference:
        name, make = _full_sequence_call(args, device, dtype)
        best, median, memory = _measure(make, args.iters, timer, device)
        print(
            f"seq={args.seq} heads={args.heads}/{args.groups} hn={args.head_dim} {args.dtype} on {device.type}: "
            f"one {name} call fwd+bwd: best {best * 1e3:.2f} ms, median {median * 1e3:.2f} ms; "
            f"peak memory {memory:.0f} MiB"
        )
        return
    _init_group(args, device)

    if args.simulate_cp:
        cp, rank = args.simulate_cp, 0
        per_rank = _simulate(args, device, dtype, timer)
        best, median, memory = (max(row[i] for row in per_rank) for i in range(3))
        medians = ", ".join(f"{row[1] * 1e3:.2f}" for row in per_rank)
        where = f"simulated, ranks one after the other (per rank: {medians} ms)"
    else:
        cp, rank = dist.get_world_size(), dist.get_rank()
        stats = torch.tensor(
            _measure(
                lambda: _ring_call(args, args.seq // cp, device, dtype, dist.group.WORLD), args.iters, timer, device
            ),
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        best, median, memory = stats.tolist()
        where = f"{dist.get_backend()}, {cp} processes"

    from model.attention.kernels import select_backend

    kernels = select_backend(torch.zeros(1, 1, 2, args.head_dim, device=device, dtype=dtype))
    if rank == 0:
        print(
            f"cp={cp} seq={args.seq} heads={args.heads}/{args.groups} hn={args.head_dim} {args.dtype} "
            f"on {device.type} ({where}); block kernels: {kernels}"
        )
        print(
            f"ring attention fwd+bwd per rank: best {best * 1e3:.2f} ms, median {median * 1e3:.2f} ms; "
            f"attention peak memory per rank {memory:.0f} MiB"
        )
        if device.type == "cuda":
            name, make = _full_sequence_call(args, device, dtype)
            full_best, full_median, full_memory = _measure(make, args.iters, timer, device)
            print(
                f"one {name} call on the whole sequence fwd+bwd: best {full_best * 1e3:.2f} ms, "
                f"median {full_median * 1e3:.2f} ms; peak memory {full_memory:.0f} MiB"
            )
            print(
                f"ring per rank / whole-sequence call (medians): {median / full_median:.3f} (ideal 1/cp = {1 / cp:.3f})"
            )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

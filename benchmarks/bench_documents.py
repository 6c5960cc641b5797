"""Benchmark: attention inside documents against causal attention over the whole packed sequence,
side by side in one process, on documents of the synthetic corpus's lengths (20 to 300 tokens).

    python -m benchmarks.bench_documents --seq 4096                    # CPU, fp32
    python -m benchmarks.bench_documents --device cuda --dtype bf16 --seq 8192

Rows, each forward + backward on the same q, k, v (a model's [s, b, h, d] seen as [b, h, s, d]):
CP = 1 (model/layers.py: one causal SDPA call against model/attention/documents.py:document_attention, on a
GPU flash-attn's varlen kernel when installed), and each rank of a ring at --cp (run one rank after
the other over a no-op process group, as scripts/bench_ring_attention.py --simulate-cp), without and
with documents. Prints the attended pairs (Σ n²/2 over s²/2), the ring blocks computed and
skipped, each row's time (median of --iters after a warm-up) and peak memory, and the ratios.
`--require-flash` refuses to run (exit 2, one line) on a GPU without flash-attn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from pretrain.profiling import peak_mib

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def document_lengths(seq: int, seed: int, lengths: tuple[int, int]) -> list[int]:
    """Documents of uniformly drawn lengths packed into `seq` tokens (the last one cut)."""
    import numpy

    rng, out = numpy.random.RandomState(seed), list[int]()
    while sum(out) < seq:
        out.append(int(rng.randint(lengths[0], lengths[1] + 1)))
    out[-1] -= sum(out) - seq
    return out


def _inputs(args: argparse.Namespace, rows: int, device: Any, dtype: Any) -> tuple[Any, ...]:
    import torch

    def draw(heads: int, grad: bool) -> Any:
        t = torch.randn(rows, 1, heads, args.head_dim, device=device, dtype=dtype, requires_grad=grad)
        return t.permute(1, 2, 0, 3)  # [b, h, s, d] view

    return draw(args.heads, True), draw(args.groups, True), draw(args.groups, True), draw(args.heads, False)


def _seconds(call: Any, device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _pair(make_a: Any, make_b: Any, iters: int, device: Any) -> tuple[tuple[float, float], tuple[float, float], float]:
    """((median s, peak MiB) of a, the same of b, median of the per-iteration time ratios b/a): the
    two run alternately after a warm-up each, so that a shared machine's load falls on both alike."""
    a, b = make_a(), make_b()
    a(), b()
    memory = [peak_mib(make_a(), device), peak_mib(make_b(), device)]  # fresh inputs each
    times = [(_seconds(a, device), _seconds(b, device)) for _ in range(iters)]
    ratio = statistics.median(tb / ta for ta, tb in times)
    first, second = (statistics.median(t[i] for t in times) for i in (0, 1))
    return (first, memory[0]), (second, memory[1]), ratio


def _local(args: argparse.Namespace, ids: Any, device: Any, dtype: Any, documents: bool) -> Any:
    import torch.nn.functional as F

    from model.attention.documents import document_attention

    def make() -> Any:
        q, k, v, dout = _inputs(args, args.seq, device, dtype)
        scale = args.head_dim**-0.5
        if documents:
            return lambda: document_attention(q, k, v, ids, scale).backward(dout)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).backward(
            dout
        )

    return make


def _ring_rows(args: argparse.Namespace, ids: Any, device: Any, dtype: Any) -> list:
    """Per simulated rank of a CP = args.cp ring: _pair's (causal, documents, ratio)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model.attention import ring as ring_attention

    shift = ring_attention._Ring.shift

    def shift_with_data(ring: Any, tensors: Any, tags: Any) -> Any:
        transfer = shift(ring, tensors, tags)
        for sent, buffer in zip(tensors, transfer.incoming):
            buffer.copy_(sent)  # real values in the receive buffers (no bytes move on a fake group)
        return transfer

    rows = []
    ring_attention._Ring.shift = shift_with_data  # type: ignore[method-assign,assignment]
    try:
        for rank in range(args.cp):
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=args.cp)

            def make(given: Any) -> Any:
                q, k, v, dout = _inputs(args, args.seq // args.cp, device, dtype)
                apply = ring_attention.RingAttentionFunction.apply
                return lambda: apply(q, k, v, dist.group.WORLD, args.head_dim**-0.5, given).backward(dout)

            rows.append(_pair(lambda: make(None), lambda: make(ids), args.iters, device))
            dist.destroy_process_group()
    finally:
        ring_attention._Ring.shift = shift  # type: ignore[method-assign]
    return rows


def ring_blocks(ids: Any, cp: int) -> tuple[int, int]:
    """(blocks a causal ring computes over all ranks and steps, of those skipped under documents)."""
    from model.attention.ring import _document_pieces, _Ring

    half, total, computed = ids.size(1) // (2 * cp), 0, 0
    for rank in range(cp):
        for step in range(cp):
            pieces = _document_pieces(step, _Ring(None, rank, cp, 0, 0), half, ids)  # type: ignore[arg-type]
            total += 3 if step == 0 else 2
            computed += len({(r.start // half, c.start // half) for _, r, c, _ in pieces})
    return total, total - computed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cp", type=int, default=4, help="ring size simulated one rank after the other")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--min-doc", type=int, default=20)
    parser.add_argument("--max-doc", type=int, default=300)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--require-flash", action="store_true", help="refuse without flash-attn (GPU rows)")
    args = parser.parse_args()

    import torch

    from model.attention.documents import attended_pairs, flash_attn_installed

    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device here")
    if args.require_flash and not (args.device == "cuda" and flash_attn_installed()):
        print("error: --require-flash: flash-attn is not installed (or no --device cuda)", file=sys.stderr)
        sys.exit(2)
    lengths = document_lengths(args.seq, 0, (args.min_doc, args.max_doc))
    ids = torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in enumerate(lengths)])[None].to(device)
    fraction = attended_pairs(ids) / (args.seq * (args.seq + 1) / 2)
    kernel = (
        "flash-attn varlen"
        if device.type == "cuda" and dtype != torch.float32 and flash_attn_installed()
        else "block kernels, one call per document"
    )
    print(
        f"seq={args.seq} heads={args.heads}/{args.groups} hn={args.head_dim} {args.dtype} on {device.type}; "
        f"{len(lengths)} documents of {args.min_doc}-{args.max_doc} tokens; attended pairs {fraction:.4f} of causal"
    )
    causal, inside, ratio = _pair(
        _local(args, ids, device, dtype, False), _local(args, ids, device, dtype, True), args.iters, device
    )
    print(f"cp=1 causal SDPA fwd+bwd: {causal[0] * 1e3:.1f} ms, peak {causal[1]:.0f} MiB")
    print(f"cp=1 documents ({kernel}) fwd+bwd: {inside[0] * 1e3:.1f} ms, peak {inside[1]:.0f} MiB")
    print(f"cp=1 documents / causal: time {ratio:.3f}, memory {inside[1] / causal[1]:.3f}")
    total, skipped = ring_blocks(ids, args.cp)
    rows = _ring_rows(args, ids, device, dtype)
    worst = lambda i, j: max(row[i][j] for row in rows)
    print(f"ring cp={args.cp}: {skipped} of {total} blocks skipped (no shared document)")
    print(f"ring cp={args.cp} causal fwd+bwd, slowest rank: {worst(0, 0) * 1e3:.1f} ms, peak {worst(0, 1):.0f} MiB")
    print(f"ring cp={args.cp} documents fwd+bwd, slowest rank: {worst(1, 0) * 1e3:.1f} ms, peak {worst(1, 1):.0f} MiB")
    ratios = ", ".join(f"{row[2]:.3f}" for row in rows)
    print(
        f"ring cp={args.cp} documents / causal: time per rank {ratios}; "
        f"slowest ranks {worst(1, 0) / worst(0, 0):.3f}, memory {worst(1, 1) / worst(0, 1):.3f}"
    )


if __name__ == "__main__":
    main()

"""Which kernel torch's scaled_dot_product_attention runs for our attention call (SDPAttention: causal,
grouped-query K/V through enable_gqa), and how fast each available kernel is for the same call:

    python -m benchmarks.sdpa_kernel --device cuda --dtype bf16 --heads 32 --groups 8 --head-dim 64 --seq 4096
    python -m benchmarks.sdpa_kernel --smoke        # tiny shapes on the CPU (the test suite runs this)

Prints one line per backend (the chosen one marked) with its forward+backward time, or why it cannot run.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from benchmarks.common import seconds


def _call(q: Any, k: Any, v: Any, scale: float) -> Any:
    import torch.nn.functional as F

    # exactly model/attention/sdpa.py:SDPAttention's call (no dropout)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.size(1) != k.size(1))


def _chosen(q: Any, k: Any, v: Any, scale: float) -> str:
    """The aten attention op the default dispatch runs (profiler event names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _call(q, k, v, scale)
    names = [e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention" in e.key]
    kernels = [n for n in names if n != "aten::scaled_dot_product_attention"]
    return kernels[0] if kernels else "aten::scaled_dot_product_attention (math)"


def _time(fn: Any, iters: int, device: Any) -> float:

    times = [seconds(fn, device) for _ in range(iters + 1)]
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.dtype, args.heads, args.groups, args.head_dim, args.seq, args.iters = (
            "cpu",
            "fp32",
            4,
            2,
            16,
            64,
            1,
        )
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    def draw(heads: int) -> Any:
        return torch.randn(args.batch, heads, args.seq, args.head_dim, device=device, dtype=dtype, requires_grad=True)

    q, k, v = draw(args.heads), draw(args.groups), draw(args.groups)
    scale = args.head_dim**-0.5
    chosen = _chosen(q, k, v, scale)
    print(
        f"{args.device} {args.dtype} heads {args.heads}/{args.groups} head_dim {args.head_dim} seq {args.seq}: "
        f"default dispatch runs {chosen}"
    )
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            with sdpa_kernel([backend]):
                seconds = _time(lambda: _call(q, k, v, scale).sum().backward(), args.iters, device)
        except RuntimeError as error:
            print(f"  {backend.name:<20} cannot run: {str(error).splitlines()[0][:100]}")
            continue
        print(f"  {backend.name:<20} forward+backward {seconds * 1e3:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

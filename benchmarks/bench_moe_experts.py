"""Benchmark: one MoE layer's forward + backward with grouped-GEMM experts (torch._grouped_mm,
model.moe.grouped_gemm) against megatron-core's sequential experts, side by side in one process.

    python -m benchmarks.bench_moe_experts                   # CPU fp32: 8, 64, 128 experts
    python -m benchmarks.bench_moe_experts --device cuda --dtype bf16 --experts 128 --top-k 8 \\
        --hidden 2048 --ffn 768 --tokens 8192                 # a Qwen3-30B-A3B-shaped layer on a GPU

Each layer is megatron-core's MoELayer (router, alltoall dispatcher, experts) as training builds it
(model/gpt.py), both variants from the same seed; the rounds alternate grouped and sequential, so
both see the same machine load. Per expert count: the best time of each (on a shared machine the
least disturbed round), their ratio, and whether the outputs agree (equal in fp32; bf16 within its
rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any


def _layer(args: argparse.Namespace, experts: int, grouped: bool, device: Any, dtype: Any) -> Any:
    """The MoE layer (MoELayer) of a one-layer model, in training mode, on `device` in `dtype`."""
    import torch

    from model.gpt import ModelBuild, build_model_chunks
    from pretrain.recipe import load_recipe

    model = load_recipe("tiny_moe").model
    moe = dataclasses.replace(
        model.moe,
        num_experts=experts,
        top_k=_top_k(args, experts),
        ffn_hidden_size=args.ffn,
        grouped_gemm=grouped,
        z_loss_coeff=0.0,
    )
    heads = max(args.hidden // 64, 1)
    model = dataclasses.replace(model, num_layers=1, hidden_size=args.hidden, num_attention_heads=heads, moe=moe)
    torch.manual_seed(0)
    (chunk,) = build_model_chunks(model, ModelBuild(), 256)
    layer: Any = chunk.decoder.layers[0].mlp  # type: ignore[union-attr, index]
    return layer.to(device=device, dtype=dtype).train()


def _top_k(args: argparse.Namespace, experts: int) -> int:
    return args.top_k if args.top_k else (2 if experts <= 8 else 8)


def _step(layer: Any, x: Any, dy: Any, device: Any) -> Any:
    """One forward + backward; returns the output."""
    import torch

    x = x.detach().requires_grad_()
    out, _ = layer(x)
    out.backward(dy)
    layer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.detach()


def bench(args: argparse.Namespace, experts: int, device: Any, dtype: Any) -> dict:
    import torch

    layers = {name: _layer(args, experts, name == "grouped", device, dtype) for name in ("sequential", "grouped")}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, 1, args.hidden, generator=g).to(device=device, dtype=dtype)  # [s, b, h]
    dy = torch.randn(args.tokens, 1, args.hidden, generator=g).to(device=device, dtype=dtype)
    outs = {name: _step(layer, x, dy, device) for name, layer in layers.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in layers}
    for i in range(args.iters):
        for name in list(layers)[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            _step(layers[name], x, dy, device)
            times[name].append(time.perf_counter() - start)
    seq, grp = (min(times[n]) for n in ("sequential", "grouped"))  # the least disturbed round of each
    a, b = outs["sequential"].float(), outs["grouped"].float()
    rel = float((a - b).norm() / a.norm().clamp_min(1e-30))
    return dict(experts=experts, top_k=_top_k(args, experts), sequential_ms=seq * 1e3, grouped_ms=grp * 1e3, rel=rel)


@contextlib.contextmanager
def _one_process(device: Any) -> Iterator[None]:
    """megatron-core's parallel state for one process (all sizes 1); the CPU layer on a CPU."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from parallel.layout import Layout, init_model_parallel, shutdown
    from upstream import cpu

    with cpu.applied() if device.type == "cpu" else contextlib.nullcontext():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        try:
            init_model_parallel(Layout(world_size=1))
            model_parallel_cuda_manual_seed(0)
            yield
        finally:
            shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--top-k", type=int, default=None, help="default: 2 for up to 8 experts, else 8")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128, help="one expert's SwiGLU inner size")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    # one thread by default: on a shared few-core machine OpenMP's spinning threads distort both sides
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round (the test suite)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.experts, args.hidden, args.ffn, args.tokens, args.iters = [8], 64, 32, 64, 1
    import torch

    from upstream.process import prepare_process

    prepare_process()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    where = f"{args.threads} CPU thread(s)" if device.type == "cpu" else torch.cuda.get_device_name()
    print(
        f"MoE layer forward+backward, {args.tokens} tokens, hidden {args.hidden}, expert ffn {args.ffn}, "
        f"{args.dtype}, {where}"
    )
    print(
        f"{'experts':>7} {'top-k':>5} {'sequential ms':>13} {'grouped ms':>10} {'speed-up':>8} {'output rel diff':>15}"
    )
    with _one_process(device):
        rows = [bench(args, e, device, dtype) for e in args.experts]
    for r in rows:
        print(
            f"{r['experts']:>7} {r['top_k']:>5} {r['sequential_ms']:>13.2f} {r['grouped_ms']:>10.2f} "
            f"{r['sequential_ms'] / r['grouped_ms']:>7.2f}x {r['rel']:>15.1e}"
        )
    last = rows[-1]
    print(
        f"{last['experts']} experts top-{last['top_k']}: grouped {last['grouped_ms']:.2f} ms, sequential "
        f"{last['sequential_ms']:.2f} ms ({last['sequential_ms'] / last['grouped_ms']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: one optimizer step of Muon (optimizer.name = muon) against AdamW on a ~100M-parameter
GPT, on one CPU process, side by side in one run (the same model, gradients and thread count).

    python -m benchmarks.bench_optimizer --steps 3

Prints per optimizer: the median seconds of megatron-core's optimizer step (gradient norm,
clipping and the update) and the bytes of optimizer state. docs/benchmarks.md holds the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Literal


def _build(name: Literal["adamw", "muon"], args: argparse.Namespace, groups: Any) -> tuple:
    import torch

    from model.config import ModelConfig
    from model.gpt import ModelBuild, build_model_chunks
    from model.precision import Precision
    from parallel.data_parallel import wrap_data_parallel
    from pretrain.optim import Numerics, OptimizerConfig, build_optimizer

    model = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.hidden // 64,
        ffn_hidden_size=args.ffn,
        seq_length=128,
        untie_embeddings=True,
    )
    chunks = build_model_chunks(model, ModelBuild(), args.vocab)
    chunks = wrap_data_parallel(chunks, False, groups)
    optimizer = build_optimizer(
        OptimizerConfig(name=name), Numerics(Precision(), 1.0, 128), chunks, False, groups=groups
    )
    torch.manual_seed(0)
    for chunk in chunks:
        for p in chunk.parameters():
            p.main_grad.copy_(torch.randn_like(p) * 1e-3)  # type: ignore[attr-defined]
    return chunks, optimizer


def _state_bytes(optimizer: Any) -> int:
    import torch

    total = 0
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in member.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for k, t in state.items() if torch.is_tensor(t) and k != "step")
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from parallel.layout import init_single_process
    from pretrain.muon import is_muon_param
    from upstream.process import prepare_process

    prepare_process()
    groups = init_single_process()
    model_parallel_cuda_manual_seed(0)
    names: tuple[Literal["adamw", "muon"], ...] = ("adamw", "muon")
    built = {name: _build(name, args, groups) for name in names}
    chunks = built["muon"][0]
    params = sum(p.numel() for c in chunks for p in c.parameters())
    matrices = sum(p.numel() for c in chunks for n, p in c.named_parameters() if is_muon_param(n, p))
    print(f"model: {params / 1e6:.1f}M parameters, {matrices / 1e6:.1f}M in Muon's matrices")
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.steps + 1):  # the first step of each is a warm-up
        for name, (_, optimizer) in built.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    for name, (_, optimizer) in built.items():
        seconds = statistics.median(times[name][1:])
        print(f"{name}: step {seconds:.3f} s, state {_state_bytes(optimizer) / 2**20:.0f} MiB")
    ratio = statistics.median(times["muon"][1:]) / statistics.median(times["adamw"][1:])
    print(f"muon / adamw step time: {ratio:.2f}")


if __name__ == "__main__":
    main()

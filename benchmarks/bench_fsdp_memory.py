"""Benchmark: per-rank bytes of weights, gradients and optimizer state vs data-parallel size, fully
sharded (parallel.fsdp) or not.

    python -m benchmarks.bench_fsdp_memory                                  # zero3 at DP 1, 2, 4
    python -m benchmarks.bench_fsdp_memory --modes zero3 zero2 ddp distopt --sizes 1 2 4 train.precision=bf16

Each (mode, size) runs on `size` spawned gloo processes, so the data-parallel size is `size`. The
model, its data-parallel wrapper and the optimizer are built as training builds them
(pretrain/trainer.py:build_stepper); one training step runs on random tokens (so gradients and Adam's
moments exist), then each rank counts the bytes of the distinct storages behind its parameters
(fully sharded: the padded fp32 shards), its gradients (`.grad`, `.main_grad`, DDP's gradient
buffers) and its optimizer state (Adam's moments, fp32 master copies), each storage once. A second
step's peak (pretrain/profiling.py:peak_mib: weights gathered for compute, activations, gradients
in flight, beyond what was live before) is reported beside it. Largest rank; MiB.

Default model (the overrides below, then any `key.path=value` given): tiny_gpt widened to hidden
1024, FFN 2816 (SwiGLU), 8 query heads on 2 K/V heads, 4 layers, 256 tokens, 4 samples per step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

DEFAULTS = [
    "model.hidden_size=1024",
    "model.ffn_hidden_size=2816",
    "model.num_attention_heads=8",
    "model.num_query_groups=2",
    "model.num_layers=4",
    "model.seq_length=256",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "logging.wandb.mode=disabled",
]
MODES = {
    "zero3": ["parallel.fsdp=zero3"],
    "zero2": ["parallel.fsdp=zero2"],
    "ddp": [],
    "distopt": ["parallel.distributed_optimizer=true"],
}


def _storages(tensors: Any) -> dict[int, int]:
    """data pointer -> bytes of each distinct storage behind `tensors` (a DTensor: its local shard)."""
    out = {}
    for t in tensors:
        if t is None:
            continue
        t = getattr(t, "_local_tensor", t)
        storage = t.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


def count_bytes(chunks: list, optimizer: Any) -> dict[str, int]:
    """Bytes of this rank's weights, gradients and optimizer state, each storage counted once."""
    params = [p for c in chunks for p in c.parameters()]
    weights = _storages(params)
    from parallel.data_parallel import local_gradients

    grad_tensors = [p.grad for p in params] + [getattr(p, "main_grad", None) for p in params]
    grad_tensors += list(local_gradients(chunks))  # DDP's buffers, FSDP's shards
    grads = {k: v for k, v in _storages(grad_tensors).items() if k not in weights}
    state: list = []
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = member.optimizer
        state += [v for s in inner.state.values() for v in s.values() if hasattr(v, "untyped_storage")]
        state += [p for g in inner.param_groups for p in g["params"]]  # fp32 masters (or the params themselves)
    opt = {k: v for k, v in _storages(state).items() if k not in weights and k not in grads}
    return {"weights": sum(weights.values()), "grads": sum(grads.values()), "optimizer": sum(opt.values())}


def _batches(recipe: Any, plan: Any, vocab: int) -> list[dict]:
    import torch

    s, b = recipe.model.seq_length, plan.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(plan.micro_batches):
        tokens = torch.randint(0, vocab, (b, s + 1), generator=gen)
        out.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "position_ids": torch.arange(s).expand(b, s),
                "loss_mask": torch.ones(b, s),
            }
        )
    return out


def _rank(rank: int, world: int, port: int, overrides: list, results: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    from pretrain.recipe import load_recipe

    recipe = load_recipe("tiny_gpt", DEFAULTS + overrides)
    from upstream.process import prepare_process

    prepare_process()
    import torch

    from parallel.layout import shutdown
    from pretrain.guards import Guards, NonfiniteGuard, StopRequest, Watchdog
    from pretrain.profiling import peak_mib
    from pretrain.trainer import build_runtime, build_stepper

    torch.set_num_threads(1)
    layout, plan, _, groups, device = build_runtime(recipe)
    vocab = 257  # the byte tokenizer
    stepper = build_stepper(recipe, layout, plan, groups, device, vocab)
    guards = Guards(StopRequest(), NonfiniteGuard("stop", 0), Watchdog(rank, 0))
    batches = _batches(recipe, plan, vocab)
    stepper.train(0, batches, guards)
    counts: dict[str, float] = dict(count_bytes(stepper.chunks, stepper.optimizer))
    counts["step_peak_mib"] = peak_mib(lambda: stepper.train(1, batches, guards), device)
    torch.save(counts, os.path.join(results, f"rank{rank}.pt"))
    shutdown()


def measure(mode: str, size: int, overrides: list) -> dict[str, float]:
    """The largest rank's counts for `mode` at data-parallel size `size`."""
    import torch
    import torch.multiprocessing as mp

    from parallel.layout import _free_port

    with tempfile.TemporaryDirectory() as results:
        mp.spawn(_rank, args=(size, _free_port(), MODES[mode] + overrides, results), nprocs=size, join=True)
        ranks = [torch.load(os.path.join(results, f"rank{r}.pt")) for r in range(size)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["zero3"], choices=list(MODES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("overrides", nargs="*", help="key.path=value, after the defaults")
    args = parser.parse_args()
    mib = 2**20
    print("| mode | dp | weights | gradients | optimizer | total | total / (dp 1 total / dp) | step peak |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        first = None
        for size in args.sizes:
            c = measure(mode, size, args.overrides)
            total = c["weights"] + c["grads"] + c["optimizer"]
            first = first or total * min(args.sizes)  # the smallest size's total, scaled to dp 1
            print(
                f"| {mode} | {size} | {c['weights'] / mib:.1f} | {c['grads'] / mib:.1f} | {c['optimizer'] / mib:.1f} "
                f"| {total / mib:.1f} | {total * size / first:.3f} | {c['step_peak_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""What the benchmarks share: the repository root, a synchronized wall-clock timer, a median over
repeated calls, a recipe's run stepped one training step at a time, and samples of random tokens
(a step's time and memory do not depend on the text)."""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.trainer import Run

REPO = pathlib.Path(__file__).resolve().parents[1]


def seconds(fn: Callable[[], Any], device: Any) -> float:
    """Wall time of one call of `fn`, with the CUDA queue drained before and after on a GPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_ms(fn: Callable[[], object], iters: int) -> float:
    """Median wall time of `iters` calls of `fn`, in milliseconds (CPU timings: no CUDA sync)."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def recipe_arguments(iters: int) -> argparse.Namespace:
    """`--recipe NAME [--iters N] [overrides...]`, the command line of a benchmark over training steps."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args()


def stepped_run(args: argparse.Namespace, port: int) -> tuple[Run, Callable[[], float]]:
    """The recipe's run as training builds it (no checkpoints, no wandb; `port` when not under
    torchrun), and a function that trains its next step (guards that skip) and returns the ms it took."""
    from pretrain.guards import Guards, NonfiniteGuard, StopRequest, Watchdog
    from pretrain.recipe import load_recipe
    from pretrain.trainer import build_run
    from upstream.process import prepare_process

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    recipe = load_recipe(args.recipe, ["logging.wandb.mode=disabled", "checkpoint.save=false", *args.overrides])
    prepare_process()
    run = build_run(recipe)
    guards = Guards(StopRequest(), NonfiniteGuard("skip", 10), Watchdog(0, 0))
    steps = iter(range(10**9))

    def train_step() -> float:
        step = next(steps)
        batches = run.stepper.plan.step_batches(run.samples["train"], step * recipe.train.global_batch_size, run.device)
        start = time.perf_counter()
        run.stepper.train(step, batches, guards)
        return 1000 * (time.perf_counter() - start)

    return run, train_step


class RandomSamples:
    """Samples of uniformly random tokens (the memory of a step does not depend on the text)."""

    def __init__(self, seq_length: int, vocab_size: int, seed: int = 0):
        self.seq_length, self.vocab_size, self.seed = seq_length, vocab_size, seed

    def __getitem__(self, i: int) -> dict:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        tokens = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {
            "tokens": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }

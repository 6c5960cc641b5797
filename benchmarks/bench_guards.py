"""Per-step cost of the fault guards (gradient check + the all-reduce every rank agrees on) and of
the token-id check (max/min of the step's batches + one all-reduce) next to a whole training step,
for one recipe in one process:

    python -m benchmarks.bench_guards --recipe tiny_gpt data.path=PREFIX [--iters 50]
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

from pretrain.guards import Guards, NonfiniteGuard, StopRequest, Watchdog, agree, grads_are_finite
from pretrain.recipe import load_recipe
from pretrain.trainer import build_run
from upstream.process import prepare_process


def _median_ms(fn: Callable[[], object], iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    recipe = load_recipe(args.recipe, ["logging.wandb.mode=disabled", "checkpoint.save=false", *args.overrides])
    prepare_process()
    run = build_run(recipe)
    guards = Guards(StopRequest(), NonfiniteGuard("skip", 10), Watchdog(0, 0))
    steps = iter(range(10**9))

    def train_step() -> None:
        step = next(steps)
        first = step * recipe.train.global_batch_size
        run.stepper.train(step, run.stepper.plan.step_batches(run.samples["train"], first, run.device), guards)

    train_step()  # warm-up; leaves real gradients in the buffers
    chunks = run.stepper.chunks
    check = _median_ms(lambda: agree([not grads_are_finite(chunks), False], run.device), args.iters)
    batches = run.stepper.plan.step_batches(run.samples["train"], 0, run.device)
    ids = _median_ms(lambda: run.stepper.check_token_ids(batches, run.samples["train"], 0), args.iters)
    whole = _median_ms(train_step, args.iters)
    params = sum(b.grad_data.numel() for c in chunks for b in c.buffers + c.expert_parallel_buffers)
    print(
        f"{params:,} gradient elements: guard {check:.3f} ms, whole step {whole:.1f} ms "
        f"(median of {args.iters}); guard share {100 * check / whole:.2f}%; token-id check {ids:.3f} ms "
        f"({100 * ids / whole:.2f}%)"
    )


if __name__ == "__main__":
    main()

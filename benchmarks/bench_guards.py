"""Per-step cost of the fault guards (gradient check + the all-reduce every rank agrees on) and of
the token-id check (max/min of the step's batches + one all-reduce) next to a whole training step,
for one recipe in one process:

    python -m benchmarks.bench_guards --recipe tiny_gpt data.path=PREFIX [--iters 50]
"""

import statistics

from benchmarks.common import median_ms, recipe_arguments, stepped_run
from pretrain.guards import agree, grads_are_finite


def main() -> None:
    args = recipe_arguments(iters=50)
    run, train_step = stepped_run(args, port=29533)
    train_step()  # warm-up; leaves real gradients in the buffers
    chunks = run.stepper.chunks
    check = median_ms(lambda: agree([not grads_are_finite(chunks), False], run.device), args.iters)
    batches = run.stepper.plan.step_batches(run.samples["train"], 0, run.device)
    ids = median_ms(lambda: run.stepper.check_token_ids(batches, run.samples["train"], 0), args.iters)
    whole = statistics.median(train_step() for _ in range(args.iters))
    params = sum(b.grad_data.numel() for c in chunks for b in c.buffers + c.expert_parallel_buffers)
    print(
        f"{params:,} gradient elements: guard {check:.3f} ms, whole step {whole:.1f} ms "
        f"(median of {args.iters}); guard share {100 * check / whole:.2f}%; token-id check {ids:.3f} ms "
        f"({100 * ids / whole:.2f}%)"
    )


if __name__ == "__main__":
    main()

"""Benchmark: what each activation recompute setting costs and saves, side by side in one process.

    python -m benchmarks.bench_recompute                     # dense: hidden 512, seq 2048, 4 layers, bf16
    python -m benchmarks.bench_recompute --moe               # the same with 8 experts (top-2) and a shared expert

Every setting's model is built as training builds it (pretrain.trainer.build_stepper) in the same
process, then the settings take turns: each round runs one training step of each (the order rotates
between rounds), so all see the same machine load. Per setting: the activation memory of a step (the
most bytes live during it beyond what was live at its start: weights, gradient buffers and optimizer
state; pretrain/profiling.py:cpu_allocator_peak_mib) next to the memory model's prediction of the
same, and the median step time as a ratio to no recompute. Extra `key.path=value` arguments override
the model further.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

DENSE = [
    "model.num_layers=4",
    "model.hidden_size=512",
    "model.ffn_hidden_size=1408",
    "model.num_attention_heads=8",
    "model.num_query_groups=2",
    "model.seq_length=2048",
    "train.micro_batch_size=1",
    "train.global_batch_size=1",
    "train.precision=bf16",
    "logging.wandb.mode=disabled",
]
MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.ffn_hidden_size=512"]
MOE += [
    "model.moe.shared_expert_ffn_hidden_size=512",
    "model.moe.capacity_factor=1.0",
    "model.moe.pad_to_capacity=true",
]

FULL_UNIFORM_1 = ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"]


def settings(moe: bool) -> dict[str, list[str]]:
    selective = ["core_attn", "layernorm"] + (["moe", "shared_experts"] if moe else ["mlp"])
    out = {"none": [], "full uniform 1": FULL_UNIFORM_1}
    for module in selective:
        out[f"selective {module}"] = ["model.recompute_granularity=selective", f"model.recompute_modules=[{module}]"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moe", action="store_true", help="8 experts, top-2, one shared expert")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from pretrain.recipe import load_recipe
    from upstream.process import prepare_process

    base = DENSE + (MOE if args.moe else []) + args.overrides
    recipes = {
        name: load_recipe("tiny_moe" if args.moe else "tiny_gpt", base + extra)
        for name, extra in settings(args.moe).items()
    }
    prepare_process()
    from pretrain.profiling import count_cpu_allocations_on_every_thread

    count_cpu_allocations_on_every_thread()
    rows = run(recipes, args.rounds)
    first = next(iter(recipes.values()))
    m = first.model
    print(
        f"{'MoE ' if args.moe else ''}hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, {m.num_layers} layers, "
        f"seq {m.seq_length}, micro-batch {first.train.micro_batch_size}, {first.train.precision}, 1 process; "
        f"median of {args.rounds} steps each, interleaved"
    )
    print("| recompute | activations measured MiB | predicted MiB | step time vs none |")
    print("|---|---|---|---|")
    none_time = rows["none"][2]
    for name, (measured, predicted, seconds) in rows.items():
        print(f"| {name} | {measured:.1f} | {predicted:.1f} | {seconds / none_time:.2f} |")


def run(recipes: dict[str, Any], rounds: int) -> dict[str, tuple[float, float, float]]:
    """Per setting: (measured activation MiB, predicted, median step seconds)."""
    from benchmarks.common import RandomSamples
    from data.loader import BatchPlan
    from planning.memory import Target, estimate
    from planning.setup import vocab_size
    from pretrain.guards import Guards, NonfiniteGuard, StopRequest, Watchdog
    from pretrain.profiling import cpu_allocator_peak_mib
    from pretrain.trainer import build_runtime, build_stepper

    first = next(iter(recipes.values()))
    layout, plan, rank, groups, device = build_runtime(first)
    vocab = vocab_size(first)
    steppers = {name: build_stepper(recipe, layout, plan, groups, device, vocab) for name, recipe in recipes.items()}
    samples = RandomSamples(first.model.seq_length, vocab)
    guards = Guards(StopRequest(), NonfiniteGuard("skip", 10), Watchdog(rank.rank, 0.0))
    batches = BatchPlan.step_batches(plan, samples, 0, device)
    for stepper in steppers.values():
        stepper.train(0, batches, guards)  # warm-up: the optimizer's state, kernel choices
    memory = {}
    for name, stepper in steppers.items():
        before, peak = cpu_allocator_peak_mib(functools.partial(stepper.train, 1, batches, guards))
        predicted = estimate(recipes[name], 1, Target.for_device("cpu", "local"), vocab).worst
        memory[name] = (peak - before, (predicted.activations + predicted.transient) / 2**20)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            steppers[name].train(2 + r, batches, guards)
            times[name].append(time.perf_counter() - start)
    return {name: (*memory[name], statistics.median(times[name])) for name in steppers}


if __name__ == "__main__":
    main()

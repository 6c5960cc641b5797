"""Benchmark: the memory model (planning/memory.py) against the measured peak of a training step.

    python -m benchmarks.bench_memory --recipe tiny_gpt model.hidden_size=512 ...
    torchrun --standalone --nproc_per_node=4 -m benchmarks.bench_memory --recipe tiny_gpt parallel.tensor=2 ...

The run is built as training builds it (pretrain.trainer: layout, process groups, model, DDP,
optimizer, Stepper), on random tokens cut per rank as the data loader cuts them. Two training steps
run (the first allocates the optimizer state lazily, as torch's Adam does); the figure is the
second: the most bytes live at any time during it, parameters, gradient buffers and optimizer
state included: on a GPU `torch.cuda.max_memory_allocated`, on the CPU the running total of torch's
CPU allocator that the profiler's allocation events carry, counted over every thread
(pretrain/profiling.py:cpu_allocator_peak_mib). Summing the events themselves, as
pretrain/profiling.py:peak_mib does, misses the frees gloo's threads make and overstated
multi-process peaks by up to 30 %. Each rank's line is printed by rank 0:

    {"rank": 0, "pipeline_rank": 0, "predicted_mib": ..., "measured_mib": ..., "error": ...,
     "static_predicted_mib": ..., "static_measured_mib": ..., ...}

where static is what is live when the step starts (weights, gradient buffers, optimizer state,
persistent communication buffers).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from benchmarks.common import RandomSamples


def _two_steps(recipe: Any, runtime: tuple, vocab_size: int) -> tuple[float, float]:
    """Builds the step as training does, runs step 0, and measures step 1: (MiB live at its start,
    most MiB live during it)."""
    import torch

    from pretrain.guards import Guards, NonfiniteGuard, StopRequest, Watchdog
    from pretrain.profiling import cpu_allocator_peak_mib
    from pretrain.trainer import build_stepper

    layout, plan, rank, groups, device = runtime
    stepper = build_stepper(recipe, layout, plan, groups, device, vocab_size)
    samples = RandomSamples(recipe.model.seq_length, vocab_size, recipe.train.seed)
    guards = Guards(StopRequest(), NonfiniteGuard("skip", 10), Watchdog(rank.rank, 0.0))
    stepper.train(0, plan.step_batches(samples, 0, device), guards)
    batches = plan.step_batches(samples, recipe.train.global_batch_size, device)
    if device.type != "cuda":
        return cpu_allocator_peak_mib(lambda: stepper.train(1, batches, guards))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device)
    stepper.train(1, batches, guards)
    torch.cuda.synchronize(device)
    return static / 2**20, torch.cuda.max_memory_allocated(device) / 2**20


def measure(recipe: Any, vocab_size: int) -> dict:
    """This rank's measured static and peak MiB of training step 1, and its coordinates."""
    from pretrain.trainer import build_runtime

    runtime = build_runtime(recipe)
    static, peak = _two_steps(recipe, runtime, vocab_size)
    return {
        "rank": runtime[2].rank,
        "pipeline_rank": runtime[3].pp.rank(),
        "device": runtime[4].type,
        "static_measured_mib": round(static, 2),
        "measured_mib": round(peak, 2),
    }


def predict(recipe: Any, world_size: int, device: str) -> Any:
    from planning.memory import Target, estimate

    return estimate(recipe, world_size, Target.for_device(device, recipe.model.transformer_impl))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("overrides", nargs="*", help="key.path=value, as on pretrain_gpt.py's command line")
    args = parser.parse_args()

    from pretrain.recipe import load_recipe

    recipe = load_recipe(args.recipe, ["logging.wandb.mode=disabled", *args.overrides])
    from upstream.process import prepare_process

    prepare_process()
    import torch.distributed as dist

    from pretrain.profiling import count_cpu_allocations_on_every_thread

    count_cpu_allocations_on_every_thread()  # before any model tensor exists (a no-op for CUDA memory)

    from parallel.layout import shutdown

    world = int(os.environ.get("WORLD_SIZE", "1"))
    from planning.setup import vocab_size as recipe_vocab_size

    vocab_size = recipe_vocab_size(recipe)
    measured = measure(recipe, vocab_size)
    estimate = predict(recipe, world, measured["device"])
    stage = estimate.stages[measured["pipeline_rank"]]
    line = {
        **measured,
        "predicted_mib": round(stage.peak / 2**20, 2),
        "static_predicted_mib": round(stage.static / 2**20, 2),
    }
    line["error"] = round(line["predicted_mib"] / line["measured_mib"] - 1, 4)
    line["terms_mib"] = {k: round(v / 2**20, 2) for k, v in stage.terms().items()}
    lines: list = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if dist.get_rank() == 0:
        for item in lines:
            print(json.dumps(item), flush=True)
    shutdown()


if __name__ == "__main__":
    main()

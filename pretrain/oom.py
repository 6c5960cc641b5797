"""Out of memory on a device as one readable block: where (rank, step, phase), the bytes the allocator
held beside what the memory model predicts for that rank, and the cheapest change that would fit."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from common.errors import EXIT_OUT_OF_MEMORY, RecipeError, RunStopped
from parallel.layout import node_size_from_env
from planning.memory import GIB, Target, estimate_setup, setup_for
from planning.report import cheapest_recompute, reserve_bytes
from pretrain.recipe import Recipe


class OutOfMemoryInStep(Exception):
    """torch.OutOfMemoryError in a phase of a step, with what the allocator held when it was caught
    (the failed step's tensors still alive through the error's traceback); the report comes later."""

    def __init__(self, step: int, phase: str, message: str, device: torch.device) -> None:
        super().__init__(message)
        self.step, self.phase, self.message = step, phase, message
        self.held = Held.now(device, message)


class OutOfMemory(RunStopped):
    """The report of an out-of-memory error; printed by the rank it happened on."""

    exit_code = EXIT_OUT_OF_MEMORY
    label = "error"
    every_rank = True  # the other ranks do not know: the failing one says it


@dataclasses.dataclass(frozen=True)
class Held:
    """What the device's caching allocator held at the failure (None on a CPU)."""

    allocated: int | None
    reserved: int | None
    capacity: int | None  # the device's memory

    @classmethod
    def now(cls, device: torch.device, message: str) -> Held:
        capacity = _capacity_in(message)
        if device.type != "cuda":
            return cls(None, None, capacity)
        total = torch.cuda.get_device_properties(device).total_memory
        return cls(torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device), capacity or total)


def _capacity_in(message: str) -> int | None:
    """The capacity the CUDA caching allocator states in its message ("total capacity of 79.11 GiB")."""
    found = re.search(r"total capacity of ([\d.e-]+) (GiB|MiB)", message)
    if not found:
        return None
    return int(float(found.group(1)) * (GIB if found.group(2) == "GiB" else 2**20))


def report(
    recipe: Recipe, world_size: int, rank: int, device: torch.device, vocab: int, error: OutOfMemoryInStep
) -> str:
    """The block: rank, step, phase; allocated/reserved at the failure beside the model's prediction for
    this rank; the cheapest recompute setting, then micro-batch, that the model says would fit."""
    held = error.held
    target = Target.for_device(device.type, recipe.model.transformer_impl)
    setup = setup_for(recipe, world_size, target, vocab, node_size_from_env())
    stage = next(s for s in estimate_setup(setup).stages if rank in s.ranks)
    predicted = stage.peak + reserve_bytes(stage, target)
    first = error.message.strip().splitlines()[0] if error.message.strip() else "out of memory"
    lines = [
        f"out of memory on rank {rank} at step {error.step}, phase {error.phase}: {first}",
        f"  at the failure: {_held(held)}",
        f"  the memory model predicts for rank {rank} (pipeline stage {stage.pipeline_rank}): peak "
        f"{_gib(stage.peak)} + {_gib(predicted - stage.peak)} device reserve = {_gib(predicted)} "
        f"(weights {_gib(stage.weights)}, grads {_gib(stage.grads)}, optimizer {_gib(stage.optimizer)}, "
        f"activations {_gib(stage.activations)})",
        f"  {cheapest_change(recipe, world_size, target, vocab, held.capacity, predicted)}",
    ]
    return "\n".join(lines)


def cheapest_change(
    recipe: Recipe, world_size: int, target: Target, vocab: int, capacity: int | None, predicted: int
) -> str:
    """The cheapest change the memory model says fits in `capacity`: a recompute setting at this
    micro-batch, else a smaller micro-batch (with the cheapest recompute that fits it), else the planner."""
    plan = f"python -m tools.plan_layout --recipe {recipe.source} --gpus {world_size} --gpu-memory-gib {{gib:.3g}}"
    if capacity is None:
        return "the device's capacity is unknown: no change computed"
    if predicted <= capacity:
        return (
            f"the model predicts this fits in {_gib(capacity)}: the rest is outside it (fragmentation: try "
            f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; another process on the device)"
        )
    micro = recipe.train.micro_batch_size
    while micro >= 1:
        train = dataclasses.replace(recipe.train, micro_batch_size=micro)
        trial = dataclasses.replace(recipe, train=train)
        try:
            found = cheapest_recompute(setup_for(trial, world_size, target, vocab, node_size_from_env()), capacity)
        except RecipeError:  # this micro-batch does not divide the global batch on this layout
            found = None
        if found is not None:
            change = [f"train.micro_batch_size={micro}"] if micro != recipe.train.micro_batch_size else []
            change += [o for o in found.overrides if not o.endswith("=null")] or found.overrides[:1]
            return (
                f"cheapest change that fits in {_gib(capacity)}: {' '.join(change)} (needs {_gib(found.needed)}, "
                f"+{100 * found.extra_forward:.0f} % forward compute for recompute)"
            )
        micro //= 2
    return f"no recompute setting or micro-batch fits in {_gib(capacity)} at this layout: {plan.format(gib=capacity / GIB)}"


def _held(held: Held) -> str:
    if held.allocated is None or held.reserved is None:
        return "allocated and reserved bytes are not measured on a CPU"
    return f"allocated {_gib(held.allocated)}, reserved {_gib(held.reserved)}"


def _gib(n: Any) -> str:
    return f"{n / 2**20:.1f} MiB" if n < GIB else f"{n / GIB:.2f} GiB"

"""Optimizer state across optimizer kinds: a checkpoint saved by the plain optimizer (DDP, FSDP),
the fp16/bf16 one or the distributed one resumes under any other, through the model-space keys
their checkpoints share.

All three keep Adam's moments under the same keys (`optimizer.state.exp_avg.<param key>`, and
`exp_avg_sq`); they differ in where the fp32 master weights live and in the structure around the
tensors:
- plain (megatron-core's FP32Optimizer: DDP in fp32, and FSDP at any precision, whose parameters
  are the fp32 masters): the masters are the model's own entries `<param key>`; the step is
  `state.common_step`;
- half (Float16OptimizerWithFloat16Params: DDP in bf16/fp16 without the distributed optimizer):
  `optimizer.state.fp32_param.<param key>`; `optimizer.state.common_step`;
- distributed (DistributedOptimizer, `fully_reshardable`): `optimizer.state.param.<param key>`; the
  step in each of `optimizer.param_groups`.
A cross-kind load reads the current optimizer's own template with each master key pointed at where
the saved kind keeps it, keeps the current structure around the loaded tensors, and sets Adam's
step to the saved one. A `dp_reshardable` save holds flat buffers, not model space: it resumes
under the distributed optimizer only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from common.errors import UserError

_CHAINED = re.compile(r"chained_\d+\.")
_MASTER = {"half": "optimizer.state.fp32_param.", "distributed": "optimizer.state.param."}


def current_kind(optimizer: Any) -> str:
    """plain | half | distributed: what `optimizer` (megatron-core's, maybe chained) saves."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    member = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    if isinstance(member, DistributedOptimizer):
        return "distributed"
    return "half" if isinstance(member, Float16OptimizerWithFloat16Params) else "plain"


def saved_kind(common: Any) -> str:
    """The kind that saved a checkpoint, from its common (non-tensor) optimizer entries: the
    distributed optimizer names its state format; the half kind nests torch's state under
    `optimizer`, the plain kind keeps it at the top (a chained optimizer: per member, by index)."""
    if isinstance(common, dict) and common and all(isinstance(k, int) for k in common):
        common = common[min(common)]
    if "param_state_sharding_type" in common:
        return "distributed"
    return "half" if "optimizer" in common else "plain"


def saved_step(common: Any) -> int | None:
    """Adam's step as the saving optimizer kept it (every parameter shares one)."""
    if isinstance(common, dict):
        if "common_step" in common:
            return int(common["common_step"])
        if "step" in common and "lr" in common:  # a param group (distributed optimizer)
            return int(common["step"])
        values: list = list(common.values())
    elif isinstance(common, list):
        values = common
    else:
        return None
    return next((s for s in map(saved_step, values) if s is not None), None)


def point_masters(template: dict, kind: str, saved: str, available: set) -> dict:
    """Re-keys, in place, the sharded tensors of a load template (model and optimizer) that must read
    fp32 master weights from where the `saved` kind keeps them; `available` = the checkpoint's keys.

    One load cannot read a key twice on a rank, so a master that the saved kind keeps as the model's
    own entry (which the template also loads as the model) moves out of the template into the
    returned {index: sharded tensor} for a second load; `fill` puts what that read back in place."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    entries = list(_sharded_entries(template))
    requested = {sharded.key for _, _, sharded in entries}
    second: dict = {}
    for container, key, sharded in entries:
        if not isinstance(sharded, ShardedTensor | ShardedTensorFactory):
            continue
        found = _pick(_master_key(sharded.key, kind, saved), available, sharded.key)
        if found == sharded.key:
            continue
        sharded.key = found
        if found in requested:
            container[key] = _Moved(len(second))
            second[len(second)] = sharded
    return second


class _Moved:
    """A template entry that a second load reads; `fill` swaps in what it read."""

    def __init__(self, index: int):
        self.index = index


def fill(template: Any, second: dict) -> None:
    """Puts the second load's tensors where `point_masters` took their entries out."""
    for container, key, value in _entries(template):
        if isinstance(value, _Moved):
            container[key] = second[value.index]


def _entries(tree: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(container, key, value) of every entry of nested dicts and lists, depth first."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in list(items):
        yield tree, key, value
        yield from _entries(value)


def _sharded_entries(tree: Any) -> Iterator[tuple[Any, Any, Any]]:
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    return ((c, k, v) for c, k, v in _entries(tree) if isinstance(v, ShardedBase))


def _master_key(key: str, kind: str, saved: str) -> str | None:
    """Where the `saved` kind keeps the master weights that `key` of the current kind reads, up to the
    `chained_<i>.` prefix of a MoE model's optimizer keys; None when `key` holds no master weights."""
    rest = key[key.find("optimizer.") :] if "optimizer." in key else None
    for master in _MASTER.values():
        if rest is not None and rest.startswith(master):
            return rest[len(master) :] if saved == "plain" else _MASTER[saved] + rest[len(master) :]
    if kind == "plain" and saved in _MASTER and rest is None:
        return _MASTER[saved] + key  # the plain kind's masters are the model's own entries
    return None


def _pick(wanted: str | None, available: set, current: str) -> str:
    """The checkpoint key that is `wanted`, maybe behind a `chained_<i>.` prefix; else `current`."""
    if wanted is None:
        return current
    prefixed = current[: current.find("optimizer.")] if "optimizer." in current else ""
    for key in (prefixed + wanted, wanted):
        if key in available:
            return key
    matches = [k for k in available if k.endswith("." + wanted) and _CHAINED.fullmatch(k[: -len(wanted)])]
    return matches[0] if len(matches) == 1 else current


def loaded_into(template: Any, loaded: Any) -> Any:
    """The template's structure (the current optimizer's own non-tensor entries) with each sharded
    entry replaced by what the load put at its place."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(template, ShardedBase):
        return loaded
    if isinstance(template, LocalNonpersistentObject):  # e.g. param ids, never saved
        return template.unwrap()
    if isinstance(template, dict):
        return {k: loaded_into(v, loaded.get(k) if isinstance(loaded, dict) else None) for k, v in template.items()}
    if isinstance(template, list):
        return [
            loaded_into(v, loaded[i] if isinstance(loaded, list) and i < len(loaded) else None)
            for i, v in enumerate(template)
        ]
    return template


def set_step(state: Any, kind: str, step: int) -> None:
    """Writes Adam's step where the current kind's load_state_dict reads it (each chained member)."""
    import torch

    members = [state[k] for k in sorted(state)] if isinstance(state, dict) and 0 in state else [state]
    for member in members:
        if kind == "distributed":
            for group in member["optimizer"]["param_groups"]:
                group["step"] = step
        else:
            target = member["optimizer"] if kind == "half" else member
            target["state"]["common_step"] = torch.tensor(float(step))


def check_translatable(kind: str, saved: str, saved_format: str | None, where: str) -> None:
    """A dp_reshardable save is not in model space: only the distributed optimizer reads it."""
    if saved == "distributed" and saved_format == "dp_reshardable" and kind != "distributed":
        raise UserError(
            f"checkpoint '{where}' holds the distributed optimizer's state as flat dp_reshardable buffers, "
            f"which only parallel.distributed_optimizer = true reads; resume with it (and save with "
            f"checkpoint.optimizer_format = fully_reshardable to change optimizer kinds)"
        )


def without_classes(state: Any) -> Any:
    """The optimizer's sharded state with every entry whose value is a class dropped, in place:
    megatron-core's offloading optimizer (optimizer.cpu_offload) keeps its host and device optimizer
    classes in each param group, and `common.pt` is read weights-only, which refuses classes. The
    loaded groups need them not (the optimizer rebuilds its parts from its own attributes)."""
    if isinstance(state, dict):
        for key in [k for k, v in state.items() if isinstance(v, type)]:
            del state[key]
        for value in state.values():
            without_classes(value)
    elif isinstance(state, list):
        for value in state:
            without_classes(value)
    return state

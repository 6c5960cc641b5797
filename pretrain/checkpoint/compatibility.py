"""Refuses to resume a checkpoint of another model, before any tensor is read: names the first
parameter whose shape differs and the recipe keys that changed (the layout may change, not the model)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import torch

from common.errors import UserError
from pretrain.checkpoint.storage import model_sharded_state_dict


def check_same_model(path: pathlib.Path, chunks: Sequence[torch.nn.Module], saved: dict, now: dict) -> None:
    """Refuses, before any tensor is read, a checkpoint of another model: names the first parameter
    whose global shape differs (or that the checkpoint lacks), the `model.*` recipe keys whose values
    differ from the recipe saved in it and a changed vocabulary size (`saved`, `now`: the checkpoint's
    `extra` and this run's; the layout may differ)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    stored = dist_checkpointing.load_tensors_metadata(str(path))
    for sharded in nested_values(model_sharded_state_dict(chunks)):
        if not isinstance(sharded, ShardedTensor):
            continue
        there = stored.get(sharded.key)
        shape = tuple(sharded.global_shape)
        if there is not None and tuple(there.global_shape) == shape:
            continue
        where = "absent in the checkpoint" if there is None else f"{tuple(there.global_shape)} in the checkpoint"
        keys = _changed_model_keys(saved.get("recipe") or {}, now.get("recipe") or {})
        vocab = saved.get("vocab_size"), now.get("vocab_size")
        if vocab[0] is not None and vocab[1] is not None and vocab[0] != vocab[1]:
            said = f"vocabulary size: {vocab[0]} in the checkpoint, {vocab[1]} now (data.tokenizer, model.vocab_size)"
            keys = f"{keys}; {said}" if keys else said
        raise UserError(
            f"checkpoint '{path}' holds another model: {sharded.key} is {where}, {shape} now"
            + (f"; {keys}" if keys else "")
            + " (resuming may change the layout, not the model)"
        )


def _changed_model_keys(saved: dict, now: dict) -> str:
    """`model.key: A in the checkpoint, B now` for each model key whose value differs."""
    flat_saved, flat_now = _flatten(saved.get("model") or {}, "model."), _flatten(now.get("model") or {}, "model.")
    changed = [k for k in flat_now if k in flat_saved and flat_saved[k] != flat_now[k]]
    return "; ".join(f"{k}: {_text(flat_saved[k])} in the checkpoint, {_text(flat_now[k])} now" for k in changed)


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _text(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

"""Checkpoints with megatron-core dist_checkpointing: complete-or-invisible saves, `auto` resume."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist

from pretrain.errors import UserError

LATEST = "latest"
# The distributed optimizer's state format. 'dp_reshardable' saves each rank's flat buffers as is
# (reloadable at another data-parallel size); megatron-core's default 'fully_sharded_model_space'
# cannot be saved in 0.16 ("ShardedTensor.flattened_range is not supported").
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
_ITER = re.compile(r"^iter_(\d{7})$")


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def complete_checkpoints(ckpt_dir: pathlib.Path) -> List[pathlib.Path]:
    """Finished checkpoints, oldest first; a save in progress lives under a `.tmp` name."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _ITER.match(p.name)]
    return sorted(found, key=lambda p: int(_ITER.match(p.name).group(1)))


def resolve_load(load: Optional[str], ckpt_dir: pathlib.Path) -> Optional[pathlib.Path]:
    """`None` -> no load; `auto` -> newest complete checkpoint in ckpt_dir (or none); else a path."""
    if load is None:
        return None
    if load == "auto":
        found = complete_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = pathlib.Path(load)
    if path.is_dir() and (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "metadata.json").is_file():
        raise UserError(f"checkpoint.load: '{load}' is not a complete checkpoint (no metadata.json)")
    return path


def refuse_to_overwrite(load: Optional[str], ckpt_dir: pathlib.Path) -> None:
    """A fresh run (no `checkpoint.load`) must not write over an earlier run's checkpoints."""
    found = complete_checkpoints(ckpt_dir)
    if load is None and found:
        raise UserError(
            f"checkpoint dir '{ckpt_dir}' already holds checkpoints (newest {found[-1].name}): "
            "resume with checkpoint.load=auto, or set another logging.dir / checkpoint.dir"
        )


def _model_sharded_state_dict(chunks) -> dict:
    sd = {}
    for i, chunk in enumerate(chunks):
        sd[f"model{i}" if len(chunks) > 1 else "model"] = _unwrap(chunk).sharded_state_dict()
    return sd


def _unwrap(chunk):
    """DDP -> the wrapped module (Float16Module or GPTModel), which knows its sharded state."""
    return getattr(chunk, "module", chunk)


def save(ckpt_dir: pathlib.Path, step: int, chunks, optimizer, extra: dict) -> pathlib.Path:
    """Writes `<dir>/iter_N.tmp`, then renames it to `iter_N` and updates `latest` (rank 0)."""
    from megatron.core import dist_checkpointing

    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / (checkpoint_name(step) + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _model_sharded_state_dict(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_OPTIMIZER_METADATA)
    state["extra"] = extra
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():  # re-saving the same step (e.g. a rerun): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(ckpt_dir / LATEST, final.name)
    dist.barrier()
    return final


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_adam_optimizers(optimizer) -> list:
    """The torch Adam instances inside megatron-core's distributed optimizer(s), when it uses them.

    megatron-core falls back to torch's AdamW when neither transformer-engine nor apex is
    installed: on every CPU, and on GPUs without them.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    return [
        m.optimizer for m in members
        if isinstance(m, distrib_optimizer.DistributedOptimizer) and m.optimizer is not None
    ]


def _give_fresh_adam_a_step(optimizer) -> None:
    """Workaround: distrib_optimizer.py:642 asserts one shared Adam `step` across param states,
    which a fresh torch Adam (no state until its first step) does not have, so a resume into a
    new process fails. Zero state, exactly what torch Adam would create lazily, satisfies it."""
    for adam in _torch_adam_optimizers(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                state = adam.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _restore_adam_steps(optimizer) -> None:
    """Workaround: after a distributed-optimizer load with torch Adam, the per-param `step` is
    wrong: megatron-core writes one shared tensor into every param's state
    (distrib_optimizer.py:823), which torch Adam then increments once per parameter per
    iteration, and with state already allocated the loaded value does not reach it at all (it
    stays 0). Either way Adam's bias correction silently drifts from the uninterrupted run. The
    checkpoint's step survives in each param group; give every param its own copy of it."""
    for adam in _torch_adam_optimizers(optimizer):
        for group in adam.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if p in adam.state:
                    adam.state[p]["step"] = torch.tensor(float(group["step"]))


def load(path: pathlib.Path, chunks, optimizer) -> dict:
    """Restores model chunks and optimizer in place; returns the `extra` dict saved with them."""
    from megatron.core import dist_checkpointing

    _give_fresh_adam_a_step(optimizer)
    template = _model_sharded_state_dict(chunks)
    template["optimizer"] = optimizer.sharded_state_dict(
        template, is_loading=True, metadata=_OPTIMIZER_METADATA
    )
    template["extra"] = None
    # Copies into parameters (and their views inside the optimizer) must not be recorded.
    with torch.no_grad():
        state = dist_checkpointing.load(template, str(path))
        for i, chunk in enumerate(chunks):
            key = f"model{i}" if len(chunks) > 1 else "model"
            _unwrap(chunk).load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer)
    return state["extra"]

"""Switching one named upstream fix (upstream/fixes.py) off, to show its upstream site failing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def unfixed(name: str) -> Iterator[None]:
    """Upstream's own code at the site of fix `name` (upstream/fixes.py) while the block runs."""
    from upstream.fixes import FIXES

    fix = next(f for f in FIXES if f.name == name)
    owner_name, _, attr = fix.name.rpartition(".")
    owner = _owner(owner_name)
    current = vars(owner)[attr]
    if hasattr(current, "__wrapped__"):
        setattr(owner, attr, current.__wrapped__)
    else:
        delattr(owner, attr)  # a method the fix added: the base class's comes back
    try:
        yield
    finally:
        setattr(owner, attr, current)


def _owner(name: str) -> object:
    from megatron.core.dist_checkpointing import optimizer as dist_optim
    from megatron.core.distributed import TorchFullyShardedDataParallel
    from megatron.core.optimizer.optimizer import FP32Optimizer
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP

    owners = {
        "TorchFullyShardedDataParallel": TorchFullyShardedDataParallel,
        "dist_checkpointing.optimizer": dist_optim,
        "FP32Optimizer": FP32Optimizer,
        "MLP": MLP,
        "SequentialMLP": SequentialMLP,
    }
    return owners[name]

"""Process start-up and exit for every entry point (training, preprocessing, conversion, tests)."""

from __future__ import annotations

import gc
import sys
import warnings
from typing import NoReturn

import torch


def quiet_dependency_warnings() -> None:
    """megatron-core warns at import about every optional fused kernel it lacks (TE, apex): on CPU
    that is expected, and a wall of it hides the progress lines."""
    for module in (r"megatron\..*", r"torch\.distributed\..*"):
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=module)
    # dist_checkpointing builds torch ShardedTensors on every save and load; torch's deprecation
    # notice is attributed to whichever frame calls it (on CPU, the device layer's function mode).
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    # The distributed optimizer's zero_grad reads `.grad` of its fp32 shards, views of the weights
    # (optimizer.py `_zero_grad_group_helper`): one notice per rank and run, attributed on a CPU to
    # the device layer's frame, so the megatron rule above misses it there.
    warnings.filterwarnings(
        "ignore", message="The .grad attribute of a Tensor that is not a leaf", category=UserWarning
    )


def _no_compile(model=None, **options):
    """torch.compile's call forms (`@torch.compile`, `torch.compile(fn)`, `torch.compile(**opts)`)
    returning the function unchanged."""
    return model if model is not None else (lambda fn: fn)


def import_megatron_without_jit_fusers() -> bool:
    """On a machine without CUDA, imports megatron-core with its JIT fuser off.

    megatron-core decorates its fused helpers (bias-GeLU, bias-SwiGLU, ...) with
    `megatron.core.jit.jit_fuser`, which is `torch.compile`, at import time; creating those
    wrappers imports TorchDynamo, most of a CPU process's start-up (docs/benchmarks.md), for
    functions our configs never call (the bias/activation fusions are off). This is upstream's
    own `disable_jit_fuser()`, done before the decorators run: `torch.compile` is the identity
    while `megatron.core` is first imported, so `jit_fuser` binds to the identity for good.
    Returns whether it did so (not with CUDA, not when megatron-core is already imported).
    """
    if torch.cuda.is_available() or "megatron.core" in sys.modules:
        return False
    original = torch.compile
    torch.compile = _no_compile
    try:
        import megatron.core  # noqa: F401  (binds megatron.core.jit.jit_fuser)
    finally:
        torch.compile = original
    return True


def prepare_process(quiet: bool = True) -> None:
    """What every process does before it uses megatron-core: dependency warnings off (unless
    `quiet` is False: --debug), megatron-core imported (without its JIT fuser on a CPU-only
    machine), its named bug fixes applied, and checkpoint loading made safe. Idempotent."""
    from upstream import fixes, safe_loading

    if quiet:
        quiet_dependency_warnings()
    import_megatron_without_jit_fusers()
    fixes.apply_all()
    safe_loading.install()


def exit_quickly(code: int) -> NoReturn:
    """sys.exit(code) without the interpreter's last full garbage collection over every object torch
    and megatron-core made at import, most of a process's exit time (docs/benchmarks.md). The objects move
    to the collector's permanent generation, which it skips; they are still freed when their modules
    are cleared, atexit hooks (wandb, multiprocessing) still run, and the OS takes back the rest.
    For entry points, once their work is done: files are written and closed by then."""
    gc.freeze()
    sys.exit(code)

"""Makes megatron-core 0.16 run on a CPU with gloo: every patch named, narrow, and only without a GPU.

megatron-core assumes CUDA at a few kinds of sites (see ../shared/notes/megatron-core-on-cpu.md).
Each `Patch` below says which upstream sites it covers; `tests/test_cpu_compat.py` shows each site
failing without its patch and working with it, so a megatron-core upgrade that fixes (or moves) a
site shows up as a failing test rather than as a silent no-op.

Nothing here is ever applied on a GPU run: `enable()` refuses when the run's device is CUDA.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal to torch factories (`device=torch.cuda.current_device()`).
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to CPU inside megatron-core calls.

    Upstream sites (megatron-core 0.16.1), among others:
    - `device="cuda"` literals: pipeline_parallel/schedules.py:596,983,2138 (token counters),
      optimizer/optimizer.py:473,481,485,907 (loss-scale and overflow buffers);
    - `device=torch.cuda.current_device()`: utils.py:631 (GlobalMemoryBuffer),
      distributed/param_and_grad_buffer.py (grad buffers), optimizer/clip_grads.py (norms);
    - `Tensor.type() == 'torch.cuda.FloatTensor'` checks: optimizer/clip_grads.py:167,
      optimizer/distrib_optimizer.py:420-433, optimizer/optimizer.py (param-group sorting):
      answered with the CUDA spelling so fp32/bf16 params take their normal path;
    - `.cuda()` / `.to("cuda")` on tensors: dist_checkpointing and the optimizers;
    - `pin_memory=True` (page-locked staging for host-to-GPU copies, needs a GPU): the RoPE
      slice per context-parallel rank, models/common/embeddings/rope_utils.py:62.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


@dataclasses.dataclass
class Patch:
    """One replacement of an attribute, with the upstream site it exists for."""

    name: str
    site: str
    target: object
    attribute: str
    replacement: object
    original: object = None

    def apply(self) -> None:
        self.original = getattr(self.target, self.attribute)
        setattr(self.target, self.attribute, self.replacement)

    def revert(self) -> None:
        setattr(self.target, self.attribute, self.original)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _patches() -> List[Patch]:
    """The attribute patches, built lazily so importing this module never imports megatron."""
    from megatron.core.tensor_parallel import random as mcore_random

    cuda = torch.cuda
    return [
        # CudaRNGStatesTracker.add/fork and model_parallel_cuda_manual_seed keep per-purpose
        # generator states (data-parallel, tensor-parallel, expert); on CPU the one CPU generator
        # plays the CUDA generator's role, so dropout inside TP regions forks from it as on GPU.
        Patch("rng.get_state", "tensor_parallel/random.py:235,238 torch.cuda.get_rng_state",
              cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state()),
        Patch("rng.manual_seed", "tensor_parallel/random.py:237,423 torch.cuda.manual_seed",
              cuda, "manual_seed", _cpu_manual_seed),
        Patch("rng.set_state", "tensor_parallel/random.py:72-110 _set_cuda_rng_state",
              mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state),
        Patch("rng.get_cuda_state", "tensor_parallel/random.py:41-69 _get_cuda_rng_state",
              mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state),
        # torch.cuda.current_device() raises on a CPU build; megatron uses it as the device of
        # its buffers (utils.py:631, distributed/param_and_grad_buffer.py) and inside autograd
        # backward functions, e.g. the sequence-parallel reduce-scatter buffer at
        # tensor_parallel/layers.py:551. Torch function modes do not reach custom autograd
        # backward passes, so the answer itself must be the CPU, not an ordinal for the mode.
        Patch("device.current_device", "utils.py:631, tensor_parallel/layers.py:551 current_device",
              cuda, "current_device", lambda: _CPU),
        # Checkpoint saving waits for device-to-host copies before writing; CPU tensors need none.
        Patch("device.synchronize", "dist_checkpointing/strategies/filesystem_async.py:230",
              cuda, "synchronize", lambda device=None: None),
    ]


class CpuCompat:
    """The applied CPU layer: attribute patches plus the device-rewriting torch function mode."""

    def __init__(self, skip: tuple = ()):
        self.patches = [p for p in _patches() if p.name not in skip]
        self.mode = None if "device.mode" in skip else CudaToCpuMode()

    def __enter__(self) -> "CpuCompat":
        for patch in self.patches:
            patch.apply()
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)
        for patch in reversed(self.patches):
            patch.revert()


def patch_names() -> List[str]:
    """Names of every patch, for tests and `--dry-run` reporting."""
    return [p.name for p in _patches()] + ["device.mode"]


_ACTIVE: Dict[str, CpuCompat] = {}


def enable(device: torch.device) -> bool:
    """Applies the layer for the rest of the process when `device` is the CPU; a no-op on CUDA.

    Returns whether the layer is active. Idempotent.
    """
    if device.type != "cpu":
        return False
    if "process" not in _ACTIVE:
        _ACTIVE["process"] = CpuCompat().__enter__()
    return True


def applied(skip: tuple = ()) -> CpuCompat:
    """Context manager form for tests: `with applied(skip=("rng.manual_seed",)): ...`."""
    return CpuCompat(skip=skip)

"""optimizer.cpu_offload on a CPU run: megatron-core's HybridDeviceOptimizer told which parameters
are the device's, so its host-copy path runs as on a GPU (part of the CPU layer, upstream/cpu.py)."""

from __future__ import annotations

import torch

from upstream.patch import Patch


def patch() -> Patch:
    """The CPU layer's patch (upstream/cpu.py applies it with the others, only without a GPU)."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    return Patch(
        "offload.device_params",
        "optimizer/cpu_offloading/hybrid_optimizer.py:299,310-323 param.is_cuda",
        HybridDeviceOptimizer,
        "_get_sub_optimizer_param_groups",
        wrap=_params_on_the_device,
    )


def _params_on_the_device(original):
    """optimizer.cpu_offload: megatron-core's HybridDeviceOptimizer offloads a parameter when
    `param.is_cuda` and puts whatever is not CUDA in its host optimizer as a host copy of a device
    parameter. On a CPU run no parameter is CUDA: nothing gets a host copy, every parameter lands in
    the host optimizer, and the first step raises KeyError looking up its device parameter
    (hybrid_optimizer.py:101). Here the CPU is the run's device: while the optimizer splits its
    parameters, the ones it was given say they are on the device, so it makes its host copies
    (fresh tensors, which do not) and runs its copy-in, host-step, copy-back path as on a GPU."""

    def split(self, offload_fraction):
        params = [p for group in self.param_groups for p in group["params"]]
        classes = [p.__class__ for p in params]
        for p, cls in zip(params, classes):
            p.__class__ = _on_device(cls)
        try:
            return original(self, offload_fraction)
        finally:
            for p, cls in zip(params, classes):
                p.__class__ = cls

    return split


_ON_DEVICE: dict[type, type] = {}


def _on_device(cls: type) -> type:
    """`cls` with `is_cuda` true (torch's tensors allow a subclass swap of `__class__`); what torch
    computes from it is a plain tensor again (as from an nn.Parameter), so the host copies are not."""
    if cls not in _ON_DEVICE:
        members = {"is_cuda": property(lambda self: True), "__torch_function__": torch._C._disabled_torch_function_impl}
        _ON_DEVICE[cls] = type(f"OnDevice{cls.__name__}", (cls,), members)
    return _ON_DEVICE[cls]

"""Named fixes for megatron-core 0.16's offloading optimizer (HybridDeviceOptimizer,
optimizer.cpu_offload): `patches()` on any device (in upstream/fixes.py's FIXES: a resume loads
its state), `cpu_patch()` in the CPU layer only (upstream/cpu.py: which parameters are the device's)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from upstream.patch import Patch


def patches() -> list[Patch]:
    """The fixes every device needs, in the order they are applied."""
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer

    return [
        Patch(
            "DistributedOptimizer._build_model_and_main_param_groups",
            "optimizer/distrib_optimizer.py:418,601-604",
            DistributedOptimizer,
            "_build_model_and_main_param_groups",
            wrap=_leaf_fp32_shards,
        ),
        Patch(
            "HybridDeviceOptimizer._update_fp32_params_by_new_state",
            "optimizer/cpu_offloading/hybrid_optimizer.py:369-374",
            HybridDeviceOptimizer,
            "_update_fp32_params_by_new_state",
            _loaded_state_to_the_host_copies,
        ),
        Patch(
            "FP32Optimizer.sharded_state_dict",
            "optimizer/optimizer.py:1017-1019",
            FP32Optimizer,
            "sharded_state_dict",
            wrap=_offloaded_state_before_a_load,
        ),
    ]


def _leaf_fp32_shards(original: Callable) -> classmethod:
    """The distributed optimizer hands its inner optimizer each fp32 parameter's shard as a view of
    the parameter (`model_param.view(-1)[range]`, distrib_optimizer.py:418; bf16 ones are detached
    first), and with offload builds a new HybridDeviceOptimizer on them (601-604), which torch
    refuses: "ValueError: can't optimize a non-leaf Tensor" for every fp32 run with the distributed
    optimizer and offload. The shards are handed detached (the same storage, attributes kept), in
    the optimizer's groups and in the distributed optimizer's own shard list alike."""

    def build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        groups = original(gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        if not config.optimizer_cpu_offload:
            return groups
        leaves = {}
        for shards in groups[3]:  # shard_fp32_groups
            for i, view in enumerate(shards):
                leaf = view.detach()
                for key, value in vars(view).items():
                    setattr(leaf, key, value)
                leaves[id(view)] = shards[i] = leaf
        for group_range in opt_group_ranges:
            group = group_range["orig_group"]
            group["params"] = [leaves.get(id(p), p) for p in group["params"]]
        return groups

    return classmethod(build)


def _loaded_state_to_the_host_copies(self: Any) -> None:
    """After a load (`_sync_hdo_state_to_sub_optimizers`, from its load_state_dict hook and from the
    distributed optimizer's parameter-state load) upstream copies each parameter's loaded
    `master_param` into its fp32 copy, looking every parameter up among those with one (bf16/fp16
    parameters): fp32 parameters have none, so any resume of an offloaded fp32 parameter (every
    distributed-optimizer shard, every fp32 run) raises KeyError. And the host copies of the
    offloaded fp32 parameters keep what they held before the load (under the distributed optimizer,
    the values of the dummy step it takes to allocate state): the first step after the resume
    steps those and copies them back (tiny_gpt bf16, distributed optimizer: loss 5.2074 vs 4.9359
    at the second step after the resume). Here: fp32 copies as upstream, and the host copies of
    fp32 parameters refreshed from the (loaded) device parameters."""
    if not self.param_update_in_fp32:
        return
    for param, state in self.state.items():
        fp32 = self.param_to_fp32_param.get(param)
        if fp32 is not None:
            fp32.data.copy_(state["master_param"])
    for device, host in self.gpu_params_map_cpu_copy.items():
        if device not in self.param_to_fp32_param:
            host.data.copy_(device.data)


def _offloaded_state_before_a_load(original: Callable) -> Callable:
    """FP32Optimizer.sharded_state_dict(is_loading=True) allocates the state to load into with the
    optimizer's `init_state_fn`, which megatron-core leaves None for the offloading optimizer
    (optimizer/__init__.py:348): "TypeError: 'NoneType' object is not callable" at every resume of
    an fp32 run with offload. Its state is allocated as the distributed optimizer allocates it
    (distrib_optimizer.py:729 `dummy_step`: one step on random gradients), with the parameters put
    back afterwards, and without the `master_param` entry it gives fp32 parameters (the parameter
    itself), which a checkpoint saved without offload does not hold."""

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

        if is_loading and self.init_state_fn is None and isinstance(self.optimizer, HybridDeviceOptimizer):
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            kept = [p.detach().clone() for p in params]
            self.optimizer.dummy_step()
            with torch.no_grad():
                for p, value in zip(params, kept):
                    p.copy_(value)
            for p, state in self.optimizer.state.items():
                if p not in self.optimizer.param_to_fp32_param:
                    state.pop("master_param", None)  # an fp32 parameter is its own: not a key to load
            is_loading = False
        return original(self, model_sharded_state_dict, is_loading, metadata)

    return sharded_state_dict


def cpu_patch() -> Patch:
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

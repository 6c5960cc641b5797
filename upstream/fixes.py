"""Named fixes for megatron-core 0.16 bugs that are not about the device (CPU and GPU alike).

Each `Fix` names the upstream site it exists for and says what goes wrong without it; the upstream
tests show each site failing unfixed. `apply_all()` runs once per process (upstream/process.py);
the two Adam-step fixes act around a checkpoint load (pretrain/checkpoint/storage.py calls them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from upstream import fsdp


@dataclasses.dataclass(frozen=True)
class Fix:
    name: str
    site: str  # upstream file and line (megatron-core 0.16.1)
    apply: Callable[[], bool]  # True when it changed something (False: already applied or not needed)


def _bind_te_general_gemm() -> bool:
    """The MoE router's gating GEMM tests `te_general_gemm is not None`, but the name is bound only
    when transformer-engine imports, so every MoE forward without TE raises NameError. Binding it to
    None selects upstream's own torch.mm path."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def _scale_aux_loss_by_tp_cp() -> bool:
    """With calculate_per_token_loss (ours, always) each tensor×context-parallel rank attaches its
    *partial* load-balancing loss (its tokens' share of the probabilities) and its z-loss
    (coefficient already divided by the tp×cp size) scaled by its *local* token count, so the summed
    gradient is 1/(tp·cp) of the single-process one: TP2 with sequence parallelism trained a
    different model (grad norm 3.0107 vs 3.0076 at step 2 on tiny_moe). Scaling by the group's token
    count is the same as multiplying the aux-loss scale by tp·cp."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    original = MoEAuxLossAutoScaler.set_loss_scale
    if getattr(original, "_scaled_by_tp_cp", False):
        return False

    def set_loss_scale(scale: torch.Tensor) -> None:
        from megatron.core import parallel_state as ps

        original(scale * ps.get_tensor_and_context_parallel_world_size())

    set_loss_scale._scaled_by_tp_cp = True  # type: ignore[attr-defined]
    MoEAuxLossAutoScaler.set_loss_scale = staticmethod(set_loss_scale)
    return True


def _keep_own_adam_step() -> bool:
    """With torch Adam (no TE/apex) a `fully_reshardable` load copies every key of a param's Adam
    state from the checkpoint, `step` included, which the checkpoint keeps only in the param groups
    (the loader skips it near line 2101): `KeyError: 'step'`. The wrapper passes the param's own step
    tensor for it (a no-op copy); the step itself is restored by `restore_adam_steps`."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_keeps_own_step", False):
        return False

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            own = self.optimizer.state[main_param].get("step")
            if own is not None:
                tensors = {**tensors, "step": own}
        return original(self, model_param, tensors)

    set_states._keeps_own_step = True  # type: ignore[attr-defined]
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    return True


def _checkpoint_without_output_without_te() -> bool:
    """`CheckpointWithoutOutput.__init__` sets `self.fp8 = fp8 is not None`, true for its default
    `fp8=False` too, so every output-discarding recompute (selective `layernorm`, `moe_act`) asks
    transformer-engine's `FP8GlobalStateManager`, bound only when TE imports: `NameError` without TE.
    Without TE there is no FP8, so the flag is set false there; with TE upstream's behaviour stays."""
    from megatron.core.tensor_parallel import random as mcore_random

    cls = mcore_random.CheckpointWithoutOutput
    original = cls.__init__
    if getattr(original, "_fp8_needs_te", False) or mcore_random.HAVE_TE:
        return False

    def __init__(self, fp8=False):
        original(self, fp8)
        self.fp8 = False

    __init__._fp8_needs_te = True  # type: ignore[attr-defined]
    __init__._upstream = original  # type: ignore[attr-defined]  # the site test runs it unfixed
    cls.__init__ = __init__
    return True


FIXES = (
    Fix("moe_utils.te_general_gemm", "transformer/moe/moe_utils.py:1192", _bind_te_general_gemm),
    Fix("MoEAuxLossAutoScaler.set_loss_scale", "transformer/moe/router.py:457-466,486-498", _scale_aux_loss_by_tp_cp),
    Fix(
        "CheckpointWithoutOutput.__init__",
        "tensor_parallel/random.py:636",
        _checkpoint_without_output_without_te,
    ),
    Fix(
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        "optimizer/distrib_optimizer.py:940",
        _keep_own_adam_step,
    ),
    # megatron-core's torch FSDP2 path (upstream/fsdp.py)
    Fix(
        "TorchFullyShardedDataParallel.finish_grad_sync",
        "distributed/finalize_model_grads.py:443, data_parallel_base.py:48",
        fsdp.finish_grad_sync_takes_force_all_reduce,
    ),
    Fix(
        "TorchFullyShardedDataParallel.scale_gradients",
        "distributed/finalize_model_grads.py:493, data_parallel_base.py:40",
        fsdp.scale_gradients,
    ),
    Fix(
        "TorchFullyShardedDataParallel.__init__",
        "distributed/torch_fully_sharded_data_parallel.py:82-85,134,144",
        fsdp.shard_with_precision_sums_and_expert_groups,
    ),
    Fix(
        "dist_checkpointing.optimizer.to_local_if_dtensor",
        "dist_checkpointing/optimizer.py:39,61",
        fsdp.optimizer_map_by_local_shard,
    ),
    Fix("FP32Optimizer.load_state_dict", "optimizer/optimizer.py:1001-1010", fsdp.fp32_optimizer_loads_dtensor_state),
    Fix("MLP.sharded_state_dict", "transformer/mlp.py:264,276-315", fsdp.gated_fc1_shards),
    Fix("SequentialMLP.sharded_state_dict", "transformer/moe/experts.py:935-985", fsdp.expert_shards_in_checkpoints),
)


def apply_all() -> list[str]:
    """Applies every fix (idempotent); returns the names of those that changed something."""
    return [fix.name for fix in FIXES if fix.apply()]


# ---------------------------------------------------------------- torch Adam inside megatron's optimizer


def _torch_adam_optimizers(optimizer: Any) -> list:
    """The torch Adam instances inside megatron-core's distributed optimizer(s), when it uses them.

    megatron-core falls back to torch's AdamW when neither transformer-engine nor apex is
    installed: on every CPU, and on GPUs without them.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    return [
        m.optimizer
        for m in members
        if isinstance(m, distrib_optimizer.DistributedOptimizer) and m.optimizer is not None
    ]


def give_fresh_adam_a_step(optimizer: Any) -> None:
    """Before a load: optimizer/distrib_optimizer.py:642 asserts one shared Adam `step` across param
    states, which a fresh torch Adam (no state until its first step) does not have, so a resume into a
    new process fails. Zero state, exactly what torch Adam would create lazily, satisfies it."""
    for adam in _torch_adam_optimizers(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                state = adam.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def restore_adam_steps(optimizer: Any) -> None:
    """After a load: with torch Adam the per-param `step` is wrong. megatron-core writes one shared
    tensor into every param's state (optimizer/distrib_optimizer.py:823), which torch Adam then
    increments once per parameter per iteration, and with state already allocated the loaded value
    does not reach it at all (it stays 0). Either way Adam's bias correction silently drifts from the
    uninterrupted run. The checkpoint's step survives in each param group; give every param its own
    copy of it."""
    for adam in _torch_adam_optimizers(optimizer):
        for group in adam.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if p in adam.state:
                    adam.state[p]["step"] = torch.tensor(float(group["step"]))

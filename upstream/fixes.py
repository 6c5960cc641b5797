"""Named fixes for megatron-core 0.16 bugs that are not about the device (CPU and GPU alike).

Each is a `Patch` (upstream/patch.py) that names the upstream site it exists for and says what goes
wrong without it; the site tests show each site failing unfixed (`FIXES.get(name).revert()`).
`apply_all()` runs once per process (upstream/process.py); the two Adam-step helpers at the end act
around a checkpoint load (pretrain/checkpoint/storage.py calls them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from upstream import fsdp, host_optimizer
from upstream.patch import Patch, PatchSet


def _scale_aux_loss_by_tp_cp(original: Callable) -> staticmethod:
    """With calculate_per_token_loss (ours, always) each tensor×context-parallel rank attaches its
    *partial* load-balancing loss (its tokens' share of the probabilities) and its z-loss
    (coefficient already divided by the tp×cp size) scaled by its *local* token count, so the summed
    gradient is 1/(tp·cp) of the single-process one: TP2 with sequence parallelism trained a
    different model (grad norm 3.0107 vs 3.0076 at step 2 on tiny_moe). Scaling by the group's token
    count is the same as multiplying the aux-loss scale by tp·cp."""

    def set_loss_scale(scale: torch.Tensor) -> None:
        from megatron.core import parallel_state as ps

        original(scale * ps.get_tensor_and_context_parallel_world_size())

    return staticmethod(set_loss_scale)


def _keep_own_adam_step(original: Callable) -> Callable:
    """With torch Adam (no TE/apex) a `fully_reshardable` load copies every key of a param's Adam
    state from the checkpoint, `step` included, which the checkpoint keeps only in the param groups
    (the loader skips it near line 2101): `KeyError: 'step'`. The wrapper passes the param's own step
    tensor for it (a no-op copy); the step itself is restored by `restore_adam_steps`."""

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            own = self.optimizer.state[main_param].get("step")
            if own is not None:
                tensors = {**tensors, "step": own}
        return original(self, model_param, tensors)

    return set_states


def _checkpoint_without_output_without_te(original: Callable) -> Callable:
    """`CheckpointWithoutOutput.__init__` sets `self.fp8 = fp8 is not None`, true for its default
    `fp8=False` too, so every output-discarding recompute (selective `layernorm`, `moe_act`) asks
    transformer-engine's `FP8GlobalStateManager`, bound only when TE imports: `NameError` without TE.
    Without TE there is no FP8, so the flag is set false there; with TE upstream's behaviour stays."""

    def __init__(self, fp8=False):
        original(self, fp8)
        self.fp8 = False

    return __init__


class _SumGradOverGroup(torch.autograd.Function):
    """Forward: identity. Backward: the gradient summed over `group` (all-reduce)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _sum_shared_rope_key_grad(original: Callable) -> Callable:
    """MLA's RoPE key part (k_pos_emb) is one per token, shared by every head. With column-parallel
    down-projections (the local spec) it leaves `gather_from_tensor_model_parallel_region` whole on
    every tensor rank, each rank expands it over its own heads only, and the gather's backward (a
    split) keeps one rank's partial gradient: at TP2 the curve drifts from one process (grad norm
    2.4e-5 relative at step 1 on tiny_deepseek, where layouts agree to 1e-7). Megatron-LM issue
    #1699. During the call the kv latent's gather (the last gather of the call) is followed by
    `copy_to_tensor_model_parallel_region` on its RoPE columns: identity forward, gradient summed
    over the tensor ranks, as upstream does for the duplicated (transformer-engine) down-projection.
    (Not upstream's `copy_to_tensor_model_parallel_region`: its backward all-reduces a contiguous
    copy of the gradient and returns the original, a no-op for this column slice's gradient.)"""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer import multi_latent_attention as mla

    def get_query_key_value_tensors(self, *args, **kwargs):
        if not isinstance(self.linear_kv_down_proj, ColumnParallelLinear) or self.tp_group.size() == 1:
            return original(self, *args, **kwargs)
        gather, calls = mla.gather_from_tensor_model_parallel_region, []
        kv_call = 0 if self.config.q_lora_rank is None else 1  # the query latent's gather comes first
        rope = self.config.qk_pos_emb_head_dim

        def gather_latent(latent, group=None):
            full = gather(latent, self.tp_group if group is None else group)
            calls.append(latent)
            if len(calls) - 1 != kv_call:
                return full
            kv, key_rope = full.split([full.size(-1) - rope, rope], dim=-1)
            return torch.cat([kv, _SumGradOverGroup.apply(key_rope, self.tp_group)], dim=-1)

        mla.gather_from_tensor_model_parallel_region = gather_latent
        try:
            return original(self, *args, **kwargs)
        finally:
            mla.gather_from_tensor_model_parallel_region = gather

    return get_query_key_value_tensors


def _postprocess_without_labels_skips_mtp(original: Callable) -> Callable:
    """With multi-token prediction, `GPTModel._postprocess` runs the MTP block and then takes
    `labels.clone()` for its loss: every forward without labels (logits, generation) fails with
    AttributeError. Without labels there is no MTP loss, and MTP changes no logits, so the fix runs
    the main output head alone there (megatron-core's own path for a model without MTP)."""

    def _postprocess(self, *args, labels=None, mtp_in_postprocess=None, **kwargs):
        if labels is not None or not self.config.mtp_num_layers:
            return original(self, *args, labels=labels, mtp_in_postprocess=mtp_in_postprocess, **kwargs)
        layers, self.config.mtp_num_layers = self.config.mtp_num_layers, None
        try:
            return original(self, *args, labels=None, mtp_in_postprocess=False, **kwargs)
        finally:
            self.config.mtp_num_layers = layers

    return _postprocess


def _mtp_token_count_over_context(original: Callable) -> Callable:
    """`GPTModel._postprocess` rolls the MTP labels and loss mask with `roll_tensor`, whose second
    result (the rolled tensor's sum) is the MTP loss's token count there: the tracker is given this
    rank's token sum over that count, averaged over the data- and context-parallel ranks. With
    context parallelism each rank divides by its own count (the ranks' counts differ: the last
    position has no target, loss masks differ), so the logged MTP loss is a mean of per-rank token
    means, not the micro-batch's token mean (Megatron-LM #4896): tiny_gpt at CP2 logged it 1.3e-5
    off one process. The fix returns the mean count of the context-parallel group: each rank's
    share is then its token sum over the group's count times the group size, and their average is
    the micro-batch's token mean. Logging only: with calculate_per_token_loss (ours, always) the
    MTP gradient takes the per-token losses, not the count."""

    def roll_tensor(tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
        rolled, total = original(tensor, shifts, dims, cp_group=cp_group, packed_seq_params=packed_seq_params)
        if cp_group is None or cp_group.size() == 1:
            return rolled, total
        total = total.double()
        torch.distributed.all_reduce(total, group=cp_group)
        return rolled, (total / cp_group.size()).float()

    return roll_tensor


def _fixes() -> list[Patch]:
    from megatron.core.models.gpt import GPTModel, gpt_model
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils

    return [
        # The MoE router's gating GEMM tests `te_general_gemm is not None`, but the name is bound only
        # when transformer-engine imports, so every MoE forward without TE raises NameError. Binding it
        # to None selects upstream's own torch.mm path.
        Patch(
            "moe_utils.te_general_gemm",
            "transformer/moe/moe_utils.py:1192",
            moe_utils,
            "te_general_gemm",
            None,
            needed=lambda: not hasattr(moe_utils, "te_general_gemm"),
        ),
        # multi_latent_attention.py sets HAVE_TE from an import of megatron-core's own TE extension,
        # which imports without transformer-engine and binds TELinear to a MagicMock; MLASelfAttention's
        # `isinstance(self.linear_proj, TELinear)` then raises TypeError for every MLA layer built.
        Patch(
            "multi_latent_attention.HAVE_TE",
            "transformer/multi_latent_attention.py:53-65,184",
            mla,
            "HAVE_TE",
            False,
            needed=lambda: not isinstance(mla.TELinear, type),
        ),
        Patch(
            "MoEAuxLossAutoScaler.set_loss_scale",
            "transformer/moe/router.py:457-466,486-498",
            moe_utils.MoEAuxLossAutoScaler,
            "set_loss_scale",
            wrap=_scale_aux_loss_by_tp_cp,
        ),
        Patch(
            "CheckpointWithoutOutput.__init__",
            "tensor_parallel/random.py:636",
            mcore_random.CheckpointWithoutOutput,
            "__init__",
            wrap=_checkpoint_without_output_without_te,
            needed=lambda: not mcore_random.HAVE_TE,
        ),
        Patch(
            "DistributedOptimizer._set_main_param_and_optimizer_states",
            "optimizer/distrib_optimizer.py:940",
            DistributedOptimizer,
            "_set_main_param_and_optimizer_states",
            wrap=_keep_own_adam_step,
        ),
        Patch(
            "MLASelfAttention.get_query_key_value_tensors",
            "transformer/multi_latent_attention.py:607,740-829",
            mla.MLASelfAttention,
            "get_query_key_value_tensors",
            wrap=_sum_shared_rope_key_grad,
        ),
        Patch(
            "GPTModel._postprocess",
            "models/gpt/gpt_model.py:611-612",
            GPTModel,
            "_postprocess",
            wrap=_postprocess_without_labels_skips_mtp,
        ),
        Patch(
            "gpt_model.roll_tensor",
            "models/gpt/gpt_model.py:626-651",
            gpt_model,
            "roll_tensor",
            wrap=_mtp_token_count_over_context,
        ),
        *fsdp.patches(),  # megatron-core's torch FSDP2 path
        *host_optimizer.patches(),  # optimizer.cpu_offload's resume
    ]


FIXES = PatchSet(_fixes)


def apply_all() -> list[str]:
    """Applies every fix (idempotent); returns the names of those that changed something."""
    return FIXES.apply()


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

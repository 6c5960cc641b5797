"""Mixture of experts on megatron-core's MoELayer: recipe keys -> config, EP-invariant expert init,
routing statistics for metrics. Parameter counts (total vs active) are in model/gpt.py."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.router import TopKRouter

from model.config import ModelConfig
from model.layers import derive_seed
from model.moe_config import moe_layer_pattern
from model.precision import Precision


def transformer_config_fields(model: ModelConfig, precision: Precision) -> dict:
    """The TransformerConfig fields for `model.moe`; empty for a dense model."""
    moe = model.moe
    if moe.num_experts is None:
        return {}
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.ffn_hidden_size or model.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_layer_freq=[int(x) for x in moe_layer_pattern(model)],
        moe_router_score_function=moe.score_function,
        moe_router_pre_softmax=moe.pre_softmax,
        moe_router_num_groups=moe.num_groups,
        moe_router_group_topk=moe.group_top_k,
        moe_router_topk_scaling_factor=moe.routed_scaling_factor,
        moe_router_load_balancing_type=moe.load_balancing,
        moe_aux_loss_coeff=moe.aux_loss_coeff if moe.load_balancing != "none" else 0.0,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.drop_policy,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_token_dispatcher_type=moe.dispatcher,
        moe_grouped_gemm=moe.grouped_gemm,
        # Routing in fp32 even when training in bf16/fp16: top-k ties and softmax are precision-
        # sensitive, and the router is tiny.
        moe_router_dtype="fp32" if precision.half else None,
    )


class SeededSequentialMLP(SequentialMLP):
    """SequentialMLP whose expert `e` is drawn from a generator seeded by (layer stream, e).

    Each expert-parallel rank builds only its own experts, so upstream's single stream gives
    expert 4 on EP rank 1 the numbers expert 0 gets on EP rank 0: a different model per EP size.
    A base seed is drawn from the layer's stream (model/layers.py seeds it per global layer), each
    expert is built from its own seed, and the stream is then restored, so whatever the layer
    builds next (shared experts) is also independent of the EP size.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(0, config, submodules, pg_collection)
        base = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # not meta: dry-run
        state = torch.get_rng_state()
        first = pg_collection.ep.rank() * num_local_experts
        self.num_local_experts = num_local_experts
        for i in range(num_local_experts):
            torch.manual_seed(derive_seed(base, first + i))
            self.local_experts.append(
                MLP(
                    self.config,
                    submodules,
                    ffn_hidden_size=self.config.moe_ffn_hidden_size,
                    is_expert=True,
                    tp_group=pg_collection.expt_tp,
                )
            )
        torch.set_rng_state(state)
        # Expert parameters live in their own gradient buffers and optimizer at every EP size
        # (upstream does so only when EP > 1): the optimizer is then chained (dense + expert)
        # at EP 1 too, so its checkpoint keys do not depend on the EP size and a run saved at
        # EP 2 resumes at EP 1. Their gradients are reduced over the expert-data-parallel group,
        # which at EP 1 is the data-parallel group: the same sum.
        for param in self.local_experts.parameters():
            param.allreduce = False


class ExpertRowParallelLinear(RowParallelLinear):
    """An expert's output projection whose output may be modified in place.

    With linear biases, megatron-core's expert MLP adds the probability-weighted bias in place
    (`output += output_bias * probs`, transformer/mlp.py:247), but the output of the
    tensor-parallel reduction is a custom-Function view, which autograd forbids modifying
    ("Output 0 of _ReduceFromModelParallelRegion is a view and is being modified inplace").
    A copy in exactly that case (expert, with bias) makes the upstream add legal.
    """

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if bias is not None and self.is_expert:
            output = output.clone()
        return output, bias


class RoutingStats:
    """Tokens per expert, per global layer, accumulated over one step from the routers' outputs.

    MoE with tensor parallelism needs sequence parallelism (megatron-core refuses it otherwise),
    so every rank routes distinct tokens, and pipeline stages hold distinct layers: one SUM
    all-reduce over the world gives exact global counts.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, pad_to_capacity: bool):
        self.top_k = top_k
        self.pad_to_capacity = pad_to_capacity
        # Accumulated where the routers run (moved to the device at the first routing): a copy to
        # the host per router call would synchronize a GPU once per MoE layer and micro-batch.
        self.load = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.routed = torch.zeros(num_layers, dtype=torch.float64)  # token-expert pairs before dropping

    def attach(self, chunks: list[torch.nn.Module]) -> int:
        """Hooks every router in `chunks`; returns how many were found."""
        count = 0
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._hook)
                    count += 1
        return count

    def _hook(self, router: TopKRouter, inputs: Any, outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return  # evaluation, or recomputation in a backward pass
        probs, routing_map = outputs
        kept = routing_map & (probs > 0) if self.pad_to_capacity else routing_map
        if self.load.device != routing_map.device:
            self.load, self.routed = self.load.to(routing_map.device), self.routed.to(routing_map.device)
        row = router.layer_number - 1
        self.load[row] += kept.sum(dim=0).detach().to(torch.float64)
        self.routed[row] += routing_map.shape[0] * self.top_k

    def reduce_and_reset(self, device: torch.device) -> dict:
        """Global counts (collective: every rank calls it), then zeroed for the next step."""
        packed = torch.cat([self.load, self.routed[:, None]], dim=1).to(device)
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()  # the step's one copy to the host
        self.load.zero_()
        self.routed.zero_()
        return {"load": packed[:, :-1], "routed": packed[:, -1]}


def load_metrics(load: torch.Tensor, routed: torch.Tensor, moe_layers: list[int]) -> dict[str, object]:
    """metrics.jsonl fields from global counts: per-layer fractions, imbalance and dropped share.

    `load[l, e]` = tokens expert e of layer l processed; `routed[l]` = token-expert pairs the
    router chose before capacity dropping. Imbalance per layer: max/mean and the coefficient of
    variation (std/mean) of the per-expert counts, per layer (`moe_load_cv_by_layer`) and for the
    worst layer (`moe_load_cv`, `moe_load_max_over_mean`).
    """
    out: dict[str, object] = {}
    fractions, max_over_mean, cv = {}, [], []
    for layer in moe_layers:
        counts = load[layer]
        total = float(counts.sum())
        mean = total / counts.numel()
        fractions[str(layer + 1)] = [round(float(c) / total, 6) if total else 0.0 for c in counts]
        max_over_mean.append(float(counts.max()) / mean if mean else 0.0)
        cv.append(float(counts.std(unbiased=False)) / mean if mean else 0.0)
    routed_total = float(routed[moe_layers].sum())
    kept_total = float(load[moe_layers].sum())
    out["moe_load_max_over_mean"] = max(max_over_mean)
    out["moe_load_cv"] = max(cv)
    out["moe_load_cv_mean"] = sum(cv) / len(cv)
    out["moe_dropped_fraction"] = (routed_total - kept_total) / routed_total if routed_total else 0.0
    out["moe_expert_load"] = fractions
    out["moe_load_cv_by_layer"] = {str(layer + 1): c for layer, c in zip(moe_layers, cv)}
    return out


def expert_bias_range(chunks: list[torch.nn.Module]) -> list[float] | None:
    """[min, max] of the aux-loss-free routing biases this rank holds; None without expert bias."""
    biases = [
        m.expert_bias for c in chunks for m in c.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None
    ]
    if not biases:
        return None
    stacked = torch.stack([b.detach().float().cpu() for b in biases])
    return [float(stacked.min()), float(stacked.max())]


# megatron-core's aux-loss tracker names -> our metric names, with how each tracked value is split:
# the load-balancing losses are partial sums over the tensor×context ranks (each holds part of the
# tokens' probabilities), the global one over the data-parallel ranks too; the z-loss is a per-rank
# token mean.
_TRACKED_LOSSES = {
    "load_balancing_loss": ("moe_aux_loss", "partial_sum"),
    "seq_load_balancing_loss": ("moe_seq_aux_loss", "partial_sum"),
    "global_load_balancing_loss": ("moe_global_aux_loss", "global_partial_sum"),
    "z_loss": ("moe_z_loss", "rank_mean"),
}
_BALANCING_TRACKERS = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


class MoeMonitor:
    """Per-step MoE metrics: balancing losses, expert load, dropped tokens, expert-bias range."""

    def __init__(self, model: ModelConfig, chunks: list[torch.nn.Module]):
        moe = model.moe
        assert moe.num_experts is not None, "MoeMonitor is for models with experts"
        # MTP modules' layers count after the decoder's, as megatron-core's trackers count them
        layers = dataclasses.replace(model, num_layers=model.num_layers + model.mtp_num_layers)
        self.moe_layers = [i for i, is_moe in enumerate(moe_layer_pattern(layers)) if is_moe]
        self.num_layers = layers.num_layers
        self.stats = RoutingStats(layers.num_layers, moe.num_experts, moe.top_k, moe.pad_to_capacity)
        self.stats.attach(chunks)
        self.chunks = chunks
        self.expert_bias = moe.expert_bias
        self.tracked = []
        if moe.load_balancing in _BALANCING_TRACKERS and moe.aux_loss_coeff > 0:
            self.tracked.append(_BALANCING_TRACKERS[moe.load_balancing])
        if moe.z_loss_coeff > 0:
            self.tracked.append("z_loss")

    def step_metrics(self, device: torch.device, micro_batches: int, data_parallel: int, ranks_per_stage: int) -> dict:
        """Collective (every rank, every step). Losses are means over MoE layers, micro-batches and
        data-parallel ranks, as megatron-core reports them; `ranks_per_stage` = world / pipeline."""
        out = load_metrics(**self.stats.reduce_and_reset(device), moe_layers=self.moe_layers)
        out.update(self._tracked_losses(device, micro_batches, data_parallel, ranks_per_stage))
        bias = self._global_bias_range(device)
        if bias is not None:
            out["moe_expert_bias_min"], out["moe_expert_bias_max"] = bias
        return out

    def _tracked_losses(
        self, device: torch.device, micro_batches: int, data_parallel: int, ranks_per_stage: int
    ) -> dict:
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        if not self.tracked:
            return {}
        tracker = get_moe_layer_wise_logging_tracker()
        rows = [
            tracker[n]["values"].detach().to(device, torch.float64)
            if n in tracker
            else torch.zeros(self.num_layers, dtype=torch.float64, device=device)
            for n in self.tracked
        ]
        values = torch.stack(rows)  # [names, layers]: this rank's sums over its micro-batches
        torch.distributed.all_reduce(values)  # pipeline stages hold disjoint layers
        clear_aux_losses_tracker()
        out = {}
        for name, row in zip(self.tracked, values.cpu()):
            metric, kind = _TRACKED_LOSSES[name]
            ranks = {"partial_sum": data_parallel, "global_partial_sum": 1}.get(kind, ranks_per_stage)
            out[metric] = float(row[self.moe_layers].mean()) / (micro_batches * ranks)
        return out

    def _global_bias_range(self, device: torch.device) -> list[float] | None:
        if not self.expert_bias:
            return None
        low, high = expert_bias_range(self.chunks) or [float("inf"), float("-inf")]  # a stage without MoE
        # one MAX all-reduce for both ends: min(x) = -max(-x)
        ends = torch.tensor([-low, high], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(ends, op=torch.distributed.ReduceOp.MAX)
        return [-float(ends[0]), float(ends[1])]

"""Grouped-GEMM experts without transformer-engine: every local expert's GEMMs as one
`torch._grouped_mm` each, with SequentialMLP's weights, initialization and checkpoint keys."""

from __future__ import annotations

import functools
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.transformer.mlp import MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from model.moe import SeededSequentialMLP


class GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] · W[e]ᵀ for every expert e, as one grouped GEMM.

    `offs`: int32 cumulative row counts (the end of each expert's rows). The backward pass is two
    grouped GEMMs in the orientations of megatron-core's linear (tensor_parallel/layers.py:531
    `grad_output.matmul(weight)`, :614 `grad_output.t().matmul(total_input)`), so each expert's
    numbers are SequentialMLP's: dx = dy · W[e] and dW[e] = dyᵀ · x over that expert's rows.
    torch's own autograd of `_grouped_mm` computes dW transposed and fails on zero rows.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, offs)
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)  # [T, in] x [E, in, out] -> [T, out]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, offs = ctx.saved_tensors
        if x.shape[0] == 0:  # no token reached this rank's experts: zero gradients, still produced
            return torch.zeros_like(x), torch.zeros_like(weight), None
        grad_x = torch._grouped_mm(grad, weight, offs=offs) if ctx.needs_input_grad[0] else None
        grad_w = torch._grouped_mm(grad.t(), x, offs=offs) if ctx.needs_input_grad[1] else None  # [E, out, in]
        return grad_x, grad_w, None


class GroupedExperts(MegatronModule):
    """SequentialMLP's interface and numbers with two grouped GEMMs for all local experts.

    The weights are SeededSequentialMLP's, stacked: `weight1` [experts, 2·ffn/etp, hidden] (each
    expert's fc1 rows: its gate then its up projection, as megatron-core's column-parallel shard)
    and `weight2` [experts, hidden, ffn/etp]; built by SeededSequentialMLP itself, so the
    initialization is that of the sequential experts at every EP/ETP size. The sharded state dict
    holds SequentialMLP's tensors under its keys (through upstream's own functions), so checkpoints
    and their optimizer states move between grouped and sequential experts either way. Expert
    tensor parallelism needs nothing here: megatron-core's dispatcher gathers the tokens over the
    expert-tensor group and reduce-scatters the partial outputs, as for SequentialMLP.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        pg_collection: Any = None,
    ):
        sequential = SeededSequentialMLP(num_local_experts, config, submodules, pg_collection)
        super().__init__(config=sequential.config)  # with ffn_hidden_size = moe_ffn_hidden_size
        if config.add_bias_linear:
            raise ValueError("GroupedExperts has no linear biases (megatron-core's GroupedMLP neither)")
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        experts = sequential.local_experts
        self.weight1 = _stacked([e.linear_fc1.weight for e in experts])
        self.weight2 = _stacked([e.linear_fc2.weight for e in experts])
        self.activation_recompute = config.recompute_granularity == "selective" and "moe_act" in (
            config.recompute_modules or []
        )
        # Checkpoints of SequentialMLP hold each expert linear's (empty) extra state; ours saves
        # the same objects and ignores them on load.
        self.register_load_state_dict_post_hook(_ignore_extra_state)

    def forward(
        self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """hidden [tokens, hidden] sorted by local expert, `tokens_per_expert` [experts], probs [tokens]."""
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP (experts.py:888)
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = torch.ones_like(probs)
        offs = torch.cumsum(tokens_per_expert.to(hidden.device), 0).to(torch.int32)
        fc1 = GroupedLinear.apply(hidden, self.weight1, offs)  # [tokens, 2·ffn/etp]
        if not self.activation_recompute:
            return GroupedLinear.apply(self._activation(fc1, probs), self.weight2, offs), None
        # moe_act: keep fc1's output, drop the activation's, rerun it in the backward pass (as
        # megatron-core's GroupedMLP, experts.py:246)
        checkpoint = tensor_parallel.CheckpointWithoutOutput()
        intermediate = checkpoint.checkpoint(self._activation, fc1, probs)
        output = GroupedLinear.apply(intermediate, self.weight2, offs)
        checkpoint.discard_output_and_register_recompute(output)
        return output, None

    def _activation(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """megatron-core MLP's unfused activation with its per-token scale (transformer/mlp.py:214)."""
        config = self.config
        if config.gated_linear_unit:
            x_glu, x_linear = torch.chunk(x, 2, dim=-1)
            if (val := config.activation_func_clamp_value) is not None:
                x_glu = x_glu.clamp(min=None, max=val)
                x_linear = x_linear.clamp(min=-val, max=val)
            out = config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
        else:
            out = config.activation_func(x)
        return (out * probs.unsqueeze(-1)).to(out.dtype)

    def backward_dw(self) -> None:
        """Weight gradients are computed in the backward pass (nothing deferred)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """SequentialMLP's sharded tensors (experts.py:935), each parameter as one factory over
        its stack, so an optimizer maps its state onto the same keys."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if metadata.get("singleton_local_shards"):
            raise NotImplementedError("GroupedExperts saves SequentialMLP's layout, not singleton_local_shards")
        first = self.ep_group.rank() * self.num_local_experts
        total = self.ep_group.size() * self.num_local_experts
        offsets = [(*sharded_offsets, (len(sharded_offsets), first + e, total)) for e in range(self.num_local_experts)]
        kwargs = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        out: dict = {}
        for name, param, axis in (("linear_fc1", self.weight1, 0), ("linear_fc2", self.weight2, 1)):
            glu = name == "linear_fc1" and self.config.gated_linear_unit
            key = f"{prefix}experts.{name}.weight"
            template = _expert_tensor(param[0], key, axis, offsets[0], kwargs)
            replica_id = (*template.replica_id[:2], self.dp_group.rank())  # as SequentialMLP: DP modulo EP
            build = functools.partial(_build_experts, offsets=offsets, axis=axis, glu=glu, kwargs=kwargs)
            merge = functools.partial(_merge_experts, glu=glu)
            out[f"{prefix}weight{name[-1]}"] = ShardedTensorFactory(key, param, build, merge, replica_id)
            for e, expert_offsets in enumerate(offsets):
                extra = make_sharded_tensors_for_checkpoint(
                    {"_extra_state": None}, f"{prefix}experts.{name}.", {}, expert_offsets, **kwargs
                )[f"{prefix}experts.{name}._extra_state"]
                extra.replica_id = (*extra.replica_id[:2], self.dp_group.rank())
                out[f"{prefix}expert{first + e}.{name}._extra_state"] = extra
        return out


def _expert_tensor(weight: torch.Tensor, key: str, axis: int, offsets: tuple, kwargs: dict) -> Any:
    """One expert's weight as SequentialMLP's linear saves it: split over the expert-tensor ranks
    along `axis`, at its global expert index (the last of `offsets`)."""
    base = key[: -len("weight")]
    return make_sharded_tensors_for_checkpoint({"weight": weight}, base, {"weight": axis}, offsets, **kwargs)[key]


def _build_experts(
    key: str,
    stack: torch.Tensor,
    replica_id: Any,
    flattened_range: Any,
    *,
    offsets: list,
    axis: int,
    glu: bool,
    kwargs: dict,
) -> list:
    """A stack's per-expert sharded tensors under `key` (the model's, or an optimizer state's that
    prefixes it); fc1 of a gated unit in its gate and up halves, as upstream's swiglu factory."""
    assert flattened_range is None, "GroupedExperts: flattened optimizer ranges are not supported"
    pieces: list = []
    for e, expert_offsets in enumerate(offsets):
        sh = _expert_tensor(stack[e], key, axis, expert_offsets, kwargs)
        sh.replica_id = replica_id
        pieces.extend(apply_swiglu_sharded_factory(sh, expert_offsets).build() if glu else [sh])
    return pieces


def _merge_experts(pieces: list, *, glu: bool) -> torch.Tensor:
    """The loaded pieces of _build_experts back into one [experts, out, in] stack."""
    if glu:
        pieces = [torch.cat(pieces[i : i + 2]) for i in range(0, len(pieces), 2)]
    return torch.stack(pieces)


def _stacked(weights: list[torch.Tensor]) -> torch.nn.Parameter:
    """One [experts, out, in] parameter from per-expert [out, in] ones, with their attributes
    (tensor-parallel partition, expert `allreduce = False`), the partition dim moved past the stack,
    marked `expert_stack` (Muon steps each expert's slice as a matrix)."""
    param = torch.nn.Parameter(torch.stack([w.detach() for w in weights]))
    for name, value in vars(weights[0]).items():
        setattr(param, name, value)
    if hasattr(param, "partition_dim"):
        param.partition_dim += 1
    param.expert_stack = True  # type: ignore[attr-defined]  # pretrain/muon.py: expert by expert
    return param


def _ignore_extra_state(module: torch.nn.Module, incompatible: Any) -> None:
    for key in [k for k in incompatible.unexpected_keys if k.endswith("_extra_state")]:
        incompatible.unexpected_keys.remove(key)

"""Muon (orthogonalized momentum) for the hidden weight matrices, AdamW for the rest, inside
megatron-core's optimizer wrappers: each matrix is orthogonalized whole, whatever the layout
splits it into (tensor-parallel shards, the distributed optimizer's flat ranges, FSDP's rows).

The math is torch.optim.Muon's (tests/e2e/test_muon_reference.py holds us to it): momentum
B <- mu B + (1 - mu) g, Nesterov's g + mu (B - g), Newton-Schulz in bf16 on the transposed matrix
when it is tall, decoupled weight decay lr * wd, the update scaled by the learning-rate adjustment
of the matrix's shape. Written here rather than taken from megatron-core's TensorParallelMuon: that
one needs the `emerging-optimizers` package, refuses the distributed optimizer, and does not split a
gated fc1 into its gate and up halves (docs/optimizers.md).

Which matrix is which: a fused QKV weight [ng * (q + k + v), h] (per query group: its query heads,
then its key and value head) is split into the Q, K and V matrices (optimizer.split_qkv; else
orthogonalized whole), a gated fc1 [gate; up] into its two halves, as separate q/k/v and gate/up
projections would be; every expert's matrices on their own, also where grouped experts hold them
stacked [experts, rows, cols] (each expert's slice is stepped as a separate matrix).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def newton_schulz(
    update: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix, in `dtype` on
    the wide orientation (torch.optim.Muon's choices; it always uses bf16). Returns `dtype`."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return x.T if tall else x


def lr_ratio(adjust_lr: str, rows: int, cols: int) -> float:
    """The factor on the learning rate for a matrix of this shape: `original` keeps the update's
    spectral scale (sqrt(max(1, rows / cols))), `match_rms_adamw` gives it AdamW's RMS (0.2 sqrt(max))."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


@dataclass(frozen=True)
class MuonSettings:
    """optimizer.muon resolved: see OptimizerConfig."""

    momentum: float
    nesterov: bool
    ns_steps: int
    ns_coefficients: tuple[float, float, float]
    eps: float
    ns_dtype: torch.dtype
    adjust_lr: str
    split_qkv: bool


@dataclass
class Matrix:
    """One Muon parameter (this rank's tensor-parallel shard of it) and how to see it whole.

    `main`: the fp32 tensor the optimizer steps for it on this rank: the parameter itself, its fp32
    copy, the distributed optimizer's flat range of it (`flat` = (start, end) in the flattened shard,
    `dp_group` the ranks holding the other ranges), or None where the distributed optimizer keeps
    none of it here. `parts`: row counts splitting the shard into separate matrices, per repeat
    (QKV: (q, k, v) per local query group; gated fc1: (ffn, ffn) once). `stacked`: the parameter
    holds local experts' matrices stacked [experts, rows, cols] (model/grouped_experts.py), each
    stepped as a separate matrix would be."""

    name: str
    param: torch.Tensor  # the model's parameter (its shape: this rank's shard)
    main: torch.Tensor | None
    tp_group: Any  # None or a group of size 1: not split
    partition_dim: int | None  # the dimension tensor parallelism splits
    parts: tuple[int, ...] | None = None
    repeats: int = 1
    flat: tuple[int, int] | None = None
    dp_group: Any = None
    stacked: bool = False  # grouped experts' [experts, rows, cols]: each expert's slice on its own


class MuonAdamW(torch.optim.AdamW):
    """torch's AdamW over megatron-core's parameter groups, except for the `matrices`, which get
    Muon with the same learning rate and weight decay. The state is created at construction so that
    checkpoint templates see it. A Muon tensor's momentum is kept under Adam's `exp_avg` key (it is
    the same running average, with beta1 = momentum) beside a `step`, and its state dict shows a
    zero `exp_avg_sq` too: megatron-core's checkpoint formats of the distributed optimizer know
    Adam's two moments only (distrib_optimizer.py get_parameter_state_dp_zero), and every kind
    saving the same keys keeps resumes across kinds (pretrain/checkpoint/optimizer_state.py) as they are."""

    def __init__(self, param_groups: list[dict], adamw: dict, settings: MuonSettings, matrices: list[Matrix]):
        # megatron-core's groups as they are (AdamW's keys set): the distributed optimizer's fp32
        # ranges are views, which torch's add_param_group refuses
        super().__init__([torch.zeros(1, requires_grad=True)], **adamw)
        self.param_groups = param_groups
        self.settings = settings
        self.matrices = matrices
        self.muon_ids = {id(m.main) for m in matrices if m.main is not None}
        init_state(self)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        assert closure is None
        kept = [g["params"] for g in self.param_groups]
        for group in self.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in self.muon_ids]
        try:
            super().step()
        finally:
            for group, params in zip(self.param_groups, kept):
                group["params"] = params
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        for matrix in self.matrices:
            self._step_matrix(matrix, groups.get(id(matrix.main)))

    def state_dict(self) -> dict[str, Any]:
        packed = super().state_dict()
        for index, state in list(packed["state"].items()):
            if "exp_avg_sq" not in state:
                packed["state"][index] = {**state, "exp_avg_sq": torch.zeros_like(state["exp_avg"])}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self.muon_ids:
                    self.state[p].pop("exp_avg_sq", None)

    def _step_matrix(self, matrix: Matrix, group: dict | None) -> None:
        """Every rank of the matrix's groups takes part, whether or not it holds a range of it."""
        s = self.settings
        main = matrix.main
        update = None
        if main is not None and main.grad is not None:
            state = self.state[main]
            state["step"] += 1
            buffer = state["exp_avg"]
            buffer.lerp_(main.grad, 1 - s.momentum)
            update = main.grad.lerp(buffer, s.momentum) if s.nesterov else buffer
        whole = _whole_shard(matrix, update)  # this rank's tensor-parallel shard, [rows, cols]
        if main is None or group is None:
            # no range of it here (distributed optimizer); a tensor-parallel peer may hold one and
            # gathers the shards with us whatever the buffers' layout, so take part, then drop it
            if _split_by_tensor(matrix):
                _orthogonalize_shard(matrix, whole, s)
            return
        orthogonal = _orthogonalize_shard(matrix, whole, s)
        piece = _own_piece(matrix, orthogonal)
        target = main.to_local() if _is_dtensor(main) else main
        target.mul_(1 - group["lr"] * group["weight_decay"])
        target.add_(piece.to(target.dtype), alpha=-group["lr"])


def init_state(optimizer: MuonAdamW, config: Any = None) -> None:
    """Zero state for every tensor (what a first step would create): Adam's two moments and step, or
    Muon's momentum (as `exp_avg`) and step. Also megatron-core's `init_state_fn` before a checkpoint load."""
    muon = optimizer.muon_ids
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "step" in state:
                continue
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if id(p) not in muon:
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _is_dtensor(t: Any) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _whole_shard(matrix: Matrix, update: torch.Tensor | None) -> torch.Tensor:
    """This rank's tensor-parallel shard of the update, whole: FSDP's rows all-gathered, or the
    distributed optimizer's flat ranges summed into zeros over their ranks (exact: each element
    comes from one rank)."""
    if matrix.flat is not None:
        flat = torch.zeros(matrix.param.numel(), dtype=torch.float32, device=matrix.param.device)
        if update is not None:
            flat[matrix.flat[0] : matrix.flat[1]] = update
        torch.distributed.all_reduce(flat, group=matrix.dp_group)
        return flat.view(matrix.param.shape)
    assert update is not None, f"{matrix.name}: no gradient"
    return update.full_tensor() if _is_dtensor(update) else update


def _own_piece(matrix: Matrix, shard_update: torch.Tensor) -> torch.Tensor:
    """The part of the (tensor-parallel shard's) update that this rank's main tensor holds."""
    if matrix.flat is not None:
        return shard_update.reshape(-1)[matrix.flat[0] : matrix.flat[1]]
    if matrix.main is not None and _is_dtensor(matrix.main):
        local = matrix.main.to_local()
        mesh = matrix.main.device_mesh
        rows = local.shape[0]
        start = mesh.get_local_rank() * rows
        return shard_update[start : start + rows]
    return shard_update


def _orthogonalize_shard(matrix: Matrix, shard: torch.Tensor, s: MuonSettings) -> torch.Tensor:
    """Newton-Schulz on each whole matrix that `shard` (this rank's tensor-parallel shard) is part
    of, scaled by its learning-rate ratio; returns this rank's shard of the result, fp32. A stack of
    experts is gathered whole (one collective per piece), then each expert's slice is orthogonalized
    on its own, as the sequential experts' separate matrices."""
    pieces = _split(matrix, shard)
    out = []
    for piece in pieces:
        whole = _gather(piece, matrix.tp_group, matrix.partition_dim)
        ratio = lr_ratio(s.adjust_lr, whole.size(-2), whole.size(-1))
        args = (s.ns_coefficients, s.ns_steps, s.eps, s.ns_dtype)
        if not matrix.stacked:
            orthogonal = newton_schulz(whole, *args).float() * ratio
            out.append(_scatter(orthogonal, matrix.tp_group, matrix.partition_dim))
            continue
        # each expert's result cut to this rank's shard at once, so no second whole stack is held
        dim = None if matrix.partition_dim is None else matrix.partition_dim - 1
        mine = torch.empty(piece.shape, dtype=torch.float32, device=piece.device)
        for e, expert in enumerate(whole.unbind(0)):
            mine[e] = _scatter(newton_schulz(expert, *args).float() * ratio, matrix.tp_group, dim)
        out.append(mine)
    return _unsplit(matrix, out, shard.shape)


def _split(matrix: Matrix, shard: torch.Tensor) -> list[torch.Tensor]:
    """The shard's pieces, one per separate matrix, each still this rank's shard of it: QKV's
    [ng_local, q + k + v, h] into Q [ng_local * q, h], K, V; gated fc1's [gate; up] into halves
    (per expert for a stack: [experts, gate; up, h] into [experts, gate, h] and [experts, up, h])."""
    if matrix.parts is None:
        return [shard]
    lead, cols = shard.shape[:-2], shard.size(-1)
    rows = shard.reshape(*lead, matrix.repeats, sum(matrix.parts), cols)
    return [p.reshape(*lead, -1, cols) for p in torch.split(rows, list(matrix.parts), dim=-2)]


def _unsplit(matrix: Matrix, pieces: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    if matrix.parts is None:
        return pieces[0]
    lead, cols = shape[:-2], shape[-1]
    per_repeat = [p.reshape(*lead, matrix.repeats, -1, cols) for p in pieces]
    return torch.cat(per_repeat, dim=-2).reshape(shape)


def _split_by_tensor(matrix: Matrix) -> bool:
    group = matrix.tp_group
    return group is not None and matrix.partition_dim is not None and group.size() > 1


def _gather(piece: torch.Tensor, group: Any, dim: int | None) -> torch.Tensor:
    """The whole matrix from every tensor-parallel rank's piece, in rank order along `dim`."""
    if group is None or dim is None or group.size() == 1:
        return piece
    pieces = [torch.empty_like(piece) for _ in range(group.size())]
    torch.distributed.all_gather(pieces, piece.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def _scatter(whole: torch.Tensor, group: Any, dim: int | None) -> torch.Tensor:
    if group is None or dim is None or group.size() == 1:
        return whole
    return whole.chunk(group.size(), dim=dim)[group.rank()]


# ---------------------------------------------------------------- which parameters, where


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """A hidden weight matrix: 2-D and neither the embedding nor the output layer, or a stack of
    experts' matrices (grouped experts)."""
    if is_expert_stack(param):
        return True
    return param.dim() == 2 and not getattr(param, "is_embedding_or_output_parameter", False)


def is_expert_stack(param: torch.Tensor) -> bool:
    """Grouped experts' [experts, rows, cols] weight (model/grouped_experts.py marks it)."""
    return param.dim() == 3 and getattr(param, "expert_stack", False)


def _is_gated_fc1(name: str, config: Any) -> bool:
    """A gated fc1 [gate; up]: a linear's, or grouped experts' stacked `weight1`."""
    return bool(config.gated_linear_unit) and name.endswith(("linear_fc1.weight", "experts.weight1"))


def model_matrices(chunks: Sequence[Any], groups: Any, split_qkv: bool) -> Iterator[tuple[str, torch.Tensor, Matrix]]:
    """(name, model parameter, its Matrix without `main`) for each Muon parameter, in the chunks'
    parameter order (the same on every rank of a stage)."""
    for chunk in chunks:
        config = chunk.config
        for name, param in chunk.named_parameters():
            if not param.requires_grad or not is_muon_param(name, param):
                continue
            expert = "experts" in name and "shared" not in name
            tp_group = groups.expt_tp if expert else groups.tp
            stacked = is_expert_stack(param)
            dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
            matrix = Matrix(name, param, None, tp_group, None if dim == -1 else dim, stacked=stacked)
            local_rows = param.shape[1 if stacked else 0]  # a DTensor (FSDP) says its whole shape
            if split_qkv and name.endswith("linear_qkv.weight"):
                q = config.num_attention_heads // config.num_query_groups * config.kv_channels
                parts = (q, config.kv_channels, config.kv_channels)
                matrix.parts, matrix.repeats = parts, local_rows // sum(parts)
            elif _is_gated_fc1(name, config):
                matrix.parts = (local_rows // 2, local_rows // 2)
            yield name, param, matrix


def install(optimizer: Any, chunks: Sequence[Any], groups: Any, settings: MuonSettings, adamw: dict) -> None:
    """Swaps the torch AdamW inside each of megatron-core's optimizer wrappers (plain, fp16/bf16,
    distributed; chained for experts) for MuonAdamW over the same parameter groups. Each wrapper
    keeps what it does around the step: master weights, gradient clipping, skipping, checkpoints."""
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    matrices = list(model_matrices(chunks, groups, settings.split_qkv))
    for member in members:
        if member.optimizer is None:
            continue
        mains = _main_tensors(member)
        mine = []
        for _, param, matrix in matrices:
            if id(param) in mains:
                matrix.main, matrix.flat, matrix.dp_group = mains[id(param)]
                mine.append(matrix)
        member.optimizer = MuonAdamW(member.optimizer.param_groups, adamw, settings, mine)
        member.init_state_fn = init_state
        if hasattr(member, "_get_main_param_and_optimizer_states"):
            _show_adam_keys(member, member.optimizer.muon_ids)


def _show_adam_keys(member: Any, muon_ids: set[int]) -> None:
    """The distributed optimizer reads and writes a tensor's state as `param`, `exp_avg`,
    `exp_avg_sq` when it checkpoints: a Muon tensor shows a zero `exp_avg_sq` (made for the
    occasion) and ignores the one it is given."""
    get, put = member._get_main_param_and_optimizer_states, member._set_main_param_and_optimizer_states

    def get_states(model_param: Any) -> dict:
        tensors = get(model_param)
        if id(tensors["param"]) in muon_ids:
            tensors = {**tensors, "exp_avg_sq": torch.zeros_like(tensors["exp_avg"])}
        return tensors

    def set_states(model_param: Any, tensors: dict) -> None:
        group, order = member.model_param_group_index_map[model_param]
        if id(member.optimizer.param_groups[group]["params"][order]) in muon_ids:
            tensors = {k: v for k, v in tensors.items() if k != "exp_avg_sq"}
        put(model_param, tensors)

    member._get_main_param_and_optimizer_states = get_states
    member._set_main_param_and_optimizer_states = set_states


def _main_tensors(member: Any) -> dict[int, tuple[Any, tuple[int, int] | None, Any]]:
    """{id(model parameter): (the tensor the wrapper steps for it here or None, its flat range in
    the parameter or None, the ranks holding the other ranges or None)} over the wrapper's parameters."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    out: dict[int, tuple[Any, tuple[int, int] | None, Any]] = {}
    if isinstance(member, DistributedOptimizer):
        for buffer in member.buffers:
            for param in buffer.params:
                if param not in member.model_param_group_index_map:
                    out[id(param)] = (None, (0, 0), member.data_parallel_group)
                    continue
                group, order = member.model_param_group_index_map[param]
                main = member.optimizer.param_groups[group]["params"][order]
                span = member._get_model_param_range_map(param)["param"]
                out[id(param)] = (main, (span.start, span.end), member.data_parallel_group)
        return out
    if isinstance(member, Float16OptimizerWithFloat16Params):
        for models, mains in zip(member.float16_groups, member.fp32_from_float16_groups):
            out.update({id(p): (m, None, None) for p, m in zip(models, mains)})
        for params in member.fp32_from_fp32_groups:
            out.update({id(p): (p, None, None) for p in params})
        return out
    for group in member.optimizer.param_groups:
        out.update({id(p): (p, None, None) for p in group["params"]})
    return out


def describe(chunks: Sequence[Any], split_qkv: bool) -> str:
    """Which parameters Muon and AdamW step, by name with layer and expert numbers as *."""
    import re

    muon: dict[str, None] = {}
    adamw: dict[str, None] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            short = re.sub(r"\.\d+\.", ".*.", name.replace("module.", ""))
            if is_muon_param(name, param):
                notes = ["each expert apart"] if is_expert_stack(param) else []
                if split_qkv and short.endswith("linear_qkv.weight"):
                    notes.append("q, k, v apart")
                elif _is_gated_fc1(short, chunk.config):
                    notes.append("gate, up apart")
                muon[short + (f" ({'; '.join(notes)})" if notes else "")] = None
            else:
                adamw[short] = None
    return f"optimizer: Muon for {', '.join(muon) or 'nothing'}; AdamW for {', '.join(adamw) or 'nothing'}"


def optimizer_name(optimizer: Any) -> str:
    """adamw | muon: what `optimizer` (megatron-core's, maybe chained) steps its matrices with."""
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    return "muon" if any(isinstance(getattr(m, "optimizer", None), MuonAdamW) for m in members) else "adamw"

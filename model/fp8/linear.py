"""FP8 training: on the local spec, megatron-core's column- and row-parallel linears with their three
GEMMs in FP8 (current scaling, tensorwise or rowwise, through torchao's float8 casts and
torch._scaled_mm), every amax reduced over the ranks holding pieces of its tensor; with
transformer-engine, the `fp8` section as TransformerConfig fields; the run-time checks of both."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
import re
import types
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from common.errors import UserError
from model.config import FP8_RECIPES_TE, Fp8Config, ModelConfig
from model.moe import ExpertRowParallelLinear

if TYPE_CHECKING:
    from torchao.float8.float8_training_tensor import Float8TrainingTensor, LinearMMConfig

Groups = tuple[dist.ProcessGroup, ...]  # process groups of size > 1


@functools.cache
def _torchao() -> _Ao:
    """torchao's float8 modules, imported on first use (4 s). On a machine without CUDA its package
    import logs a failure for each CUDA kernel library it ships; those kernels are never used here."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    if not torch.cuda.is_available():
        for log in quiet:
            log.setLevel(logging.ERROR)
    try:
        import torchao.float8.config as config
        import torchao.float8.float8_ops  # noqa: F401  (registers the float8 mm on Float8TrainingTensor)
        import torchao.float8.float8_training_tensor as tensor
        import torchao.float8.float8_utils as utils
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return _Ao(config, tensor, utils)


@dataclasses.dataclass(frozen=True)
class _Ao:
    config: types.ModuleType  # torchao.float8.config
    tensor: types.ModuleType  # torchao.float8.float8_training_tensor
    utils: types.ModuleType  # torchao.float8.float8_utils

    @functools.cached_property
    def mm_config(self) -> LinearMMConfig:
        """torchao's choices for the three GEMMs: fast accumulation in the forward GEMM only, and the
        inner dimension zero-padded to 16 where CUDA needs it (expert token counts); zeros add nothing."""
        cfg = self.tensor.ScaledMMConfig
        return self.tensor.LinearMMConfig(
            output=cfg(emulate=False, use_fast_accum=True, fp8_output=False, pad_inner_dim=True),
            grad_input=cfg(emulate=False, use_fast_accum=False, fp8_output=False, pad_inner_dim=True),
            grad_weight=cfg(emulate=False, use_fast_accum=False, fp8_output=False, pad_inner_dim=True),
        )


@dataclasses.dataclass(frozen=True)
class Fp8Gemms:
    """How one linear runs its GEMMs in FP8; the layer spec gives each FP8 linear one (`to_fp8`)."""

    forward_dtype: torch.dtype  # activations and weights
    backward_dtype: torch.dtype  # output gradients
    rowwise: bool  # one scale per row (per token, per output channel) instead of per tensor
    cp_group: dist.ProcessGroup | None = (
        None  # context-parallel group: ranks holding other tokens of the same sequences
    )


def gemms_for(fp8: Fp8Config, cp_group: dist.ProcessGroup | None = None) -> Fp8Gemms:
    """The local FP8 linears' settings for `fp8` (e4m3/e5m2 as torchao names them for this device)."""
    ao = _torchao().config
    return Fp8Gemms(
        forward_dtype=ao.e4m3_dtype,
        backward_dtype=ao.e5m2_dtype if fp8.format == "hybrid" else ao.e4m3_dtype,
        rowwise=fp8.recipe == "rowwise",
        cp_group=cp_group,
    )


def fp8_layer(fp8: Fp8Config, layer: int, num_layers: int) -> bool:
    """Whether decoder layer `layer` (global, 1-based) runs its GEMMs in FP8."""
    n = fp8.first_last_layers_bf16
    return fp8.enabled and n < layer <= num_layers - n


# ------------------------------------------------------------------------------------------ scaling


@dataclasses.dataclass(frozen=True)
class _Split:
    """The process groups across which a 2-D operand's rows and columns are spread."""

    rows: Groups
    cols: Groups

    def groups(self, axis: int | None) -> Groups:
        """Where an amax over `axis` must be reduced: one scale (None) covers every piece; one per
        row (-1) spans the columns; one per column (0) spans the rows."""
        return {None: self.rows + self.cols, -1: self.cols, 0: self.rows}[axis]


@dataclasses.dataclass(frozen=True)
class _Splits:
    """Where a linear's operands are spread. Inside megatron-core's linear every token of a
    micro-batch's sequence slice is present (sequence parallelism is gathered first), so tokens
    differ only across context-parallel ranks; features split over the linear's tensor-parallel
    group: the output features of a column-parallel weight, the input features of a row-parallel one."""

    input: _Split  # [tokens, in]
    weight: _Split  # [out, in]
    grad_output: _Split  # [tokens, out]

    @staticmethod
    def of(column: bool, tp_group: dist.ProcessGroup | None, cp_group: dist.ProcessGroup | None) -> _Splits:
        tp, cp = _sized(tp_group), _sized(cp_group)
        if column:
            return _Splits(input=_Split(cp, ()), weight=_Split(tp, ()), grad_output=_Split(cp, tp))
        return _Splits(input=_Split(cp, tp), weight=_Split((), tp), grad_output=_Split(cp, ()))


def _sized(group: dist.ProcessGroup | None) -> Groups:
    return (group,) if group is not None and group.size() > 1 else ()


def _amax(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """max |x| over everything (axis None) or along `axis`, kept as a size-1 dim; 0 where x is empty
    (an expert without tokens still joins the reductions)."""
    if axis is None:
        return x.abs().max().float() if x.numel() else x.new_zeros((), dtype=torch.float32)
    if x.shape[axis] == 0:
        shape = list(x.shape)
        shape[axis] = 1
        return x.new_zeros(shape, dtype=torch.float32)
    if x.device.type == "cpu":  # torch's CPU reductions along a dim are several times faster in fp32 than bf16
        x = x.float()
    return torch.amax(x.abs(), dim=axis, keepdim=True).float()


def quantize(
    x: torch.Tensor, dtype: torch.dtype, role: str, split: _Split, axis: int | None, scale: torch.Tensor | None = None
) -> Float8TrainingTensor:
    """`x` [rows, cols] as torchao's Float8TrainingTensor in `dtype` with current scaling: one scale
    (axis None) or one per row (-1) or column (0), from the amax over every rank holding part of
    what the scale covers, so each layout casts with the scales one process would. `scale` reuses a
    scale computed before (the weight's, from forward to backward)."""
    ao = _torchao()
    if scale is None:
        amax = _amax(x, axis)
        for group in split.groups(axis):
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        scale = ao.utils.amax_to_scale(amax, dtype)
    gemm_role = ao.tensor.GemmInputRole[role]
    return ao.tensor.hp_tensor_and_scale_to_float8(x, scale, dtype, ao.mm_config, gemm_role, axis)


class Fp8LinearFunction(torch.autograd.Function):
    """y = x wᵀ (+ b) with its three GEMMs in FP8 through torch._scaled_mm: forward x·wᵀ with x and w
    in the forward dtype, backward dy·w (input gradient) and dyᵀ·x (weight gradient) with dy in the
    backward dtype. Keeps x in FP8 for the weight gradient (cast for that GEMM) and w as it is."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemms: Fp8Gemms, splits: _Splits
    ) -> torch.Tensor:
        ctx.gemms, ctx.splits, ctx.x_shape, ctx.x_dtype = gemms, splits, x.shape, x.dtype
        ctx.use_bias = bias is not None
        fwd, row = gemms.forward_dtype, -1 if gemms.rowwise else None
        x2 = x.reshape(-1, x.shape[-1])  # [s*b, in]
        xq = quantize(x2, fwd, "INPUT", splits.input, row)
        wq = quantize(weight, fwd, "WEIGHT", splits.weight, row)
        out = torch.mm(xq, wq.t())  # [s*b, out]
        # The weight gradient contracts over tokens: rowwise, x is cast again with one scale per column.
        x_wgrad = quantize(x2, fwd, "INPUT", splits.input, 0) if gemms.rowwise else xq
        ctx.save_for_backward(x_wgrad._data, x_wgrad._scale, weight, None if gemms.rowwise else wq._scale)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_data, x_scale, weight, w_scale = ctx.saved_tensors
        gemms, splits, ao = ctx.gemms, ctx.splits, _torchao()
        g2 = grad_output.reshape(-1, grad_output.shape[-1])  # [s*b, out]
        cast = functools.partial(quantize, g2, gemms.backward_dtype, "GRAD_OUTPUT", splits.grad_output)
        if gemms.rowwise:  # the input gradient contracts over out (scales per row), the weight's over tokens
            g_rows, g_cols = cast(-1), cast(0)
            w_cols = quantize(weight, gemms.forward_dtype, "WEIGHT", splits.weight, 0)
        else:  # the forward's weight scale: the same FP8 weight as the forward GEMM, no new reduction
            g_rows = g_cols = cast(None)
            w_cols = quantize(weight, gemms.forward_dtype, "WEIGHT", splits.weight, None, scale=w_scale)
        grad_x = torch.mm(g_rows, w_cols).view(ctx.x_shape)
        axis = 0 if gemms.rowwise else None
        role = ao.tensor.GemmInputRole.INPUT
        xq = ao.tensor.Float8TrainingTensor(x_data, x_scale, ctx.x_dtype, ao.mm_config, role, axis)
        grad_w = torch.mm(g_cols.t(), xq)
        grad_b = g2.sum(dim=0) if ctx.use_bias else None
        return grad_x, grad_w, grad_b, None, None


class _Fp8Linear:
    """megatron-core's linear with Fp8LinearFunction in place of its own autograd Function; the
    tensor-parallel communication around the GEMMs stays megatron-core's (its mapping functions)."""

    def __init__(self, *args: Any, fp8: Fp8Gemms, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fp8 = fp8
        column = isinstance(self, ColumnParallelLinear)
        self.fp8_splits = _Splits.of(column, self.tp_group, fp8.cp_group)  # type: ignore[attr-defined]

    def _forward_impl(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gradient_accumulation_fusion: bool,
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        grad_output_buffer: list[torch.Tensor] | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        if gradient_accumulation_fusion or grad_output_buffer is not None:
            raise RuntimeError("FP8 linears support neither gradient-accumulation fusion nor deferred wgrad")
        group = self.tp_group  # type: ignore[attr-defined]
        if sequence_parallel:  # what megatron-core's Function does inside: all-gather, reduce-scatter back
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
        elif allreduce_dgrad:  # identity forward, input-gradient all-reduce backward
            input = copy_to_tensor_model_parallel_region(input, group=group)
        return Fp8LinearFunction.apply(input, weight, bias, self.fp8, self.fp8_splits)


class Fp8ColumnParallelLinear(_Fp8Linear, ColumnParallelLinear):
    pass


class Fp8RowParallelLinear(_Fp8Linear, RowParallelLinear):
    pass


class Fp8ExpertRowParallelLinear(_Fp8Linear, ExpertRowParallelLinear):
    pass


FP8_LINEARS = {
    ColumnParallelLinear: Fp8ColumnParallelLinear,
    RowParallelLinear: Fp8RowParallelLinear,
    ExpertRowParallelLinear: Fp8ExpertRowParallelLinear,
}


def to_fp8(spec: ModuleSpec, gemms: Fp8Gemms) -> None:
    """Swaps, in place, every column- and row-parallel linear under a layer's spec (attention, MLP,
    routed and shared experts) for its FP8 form; the router and norms are not linears of that kind."""
    submodules = getattr(spec, "submodules", None)
    if submodules is None or not dataclasses.is_dataclass(submodules):
        return
    for f in dataclasses.fields(submodules):
        value = getattr(submodules, f.name)
        if isinstance(value, type) and value in FP8_LINEARS:
            setattr(submodules, f.name, ModuleSpec(module=FP8_LINEARS[value], params={"fp8": gemms}))
        elif isinstance(value, ModuleSpec):
            to_fp8(value, gemms)


# ------------------------------------------------------------------------------- transformer-engine


def transformer_config_fields(fp8: Fp8Config, model: ModelConfig) -> dict[str, Any]:
    """megatron-core's TransformerConfig fields for `fp8` with transformer-engine, whose autocast
    (per layer, first/last layers left out) and amax reductions then do the work; empty otherwise.
    The local spec keeps TransformerConfig.fp8 unset: megatron-core would ignore it without
    transformer-engine, and our linears carry their own settings."""
    if not fp8.enabled or model.transformer_impl != "transformer_engine":
        return {}
    fields: dict[str, Any] = dict(
        fp8=fp8.format,
        fp8_recipe=fp8.recipe,
        fp8_param=fp8.params,
        fp8_margin=fp8.margin or 0,
        fp8_amax_history_len=fp8.amax_history_len or 1,
        fp8_amax_compute_algo=fp8.amax_compute_algo or "most_recent",
    )
    if fp8.first_last_layers_bf16:
        n = fp8.first_last_layers_bf16
        fields.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=n, num_layers_at_end_in_bf16=n)
    return fields


# Lowest compute capability for each recipe with transformer-engine: FP8 tensor cores from Ada/Hopper
# (8.9); 128-element block scaling on Hopper (9.0); MXFP8 on Blackwell (10.0).
TE_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


def check_runtime(fp8: Fp8Config, model: ModelConfig, device: torch.device) -> None:
    """What the recipe checks cannot see: transformer-engine and its version, the device's FP8
    support. Raises UserError (one line, exit 2); nothing when fp8 is off."""
    if not fp8.enabled:
        return
    if model.transformer_impl == "transformer_engine":
        _check_transformer_engine(fp8, device)
    else:
        _check_scaled_mm(fp8, device)


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _check_transformer_engine(fp8: Fp8Config, device: torch.device) -> None:
    need = FP8_RECIPES_TE[fp8.recipe]
    what = f"fp8.recipe = {fp8.recipe} with model.transformer_impl = transformer_engine"
    if importlib.util.find_spec("transformer_engine") is None:
        raise UserError(
            f"{what} needs transformer-engine >= {need}, which is not installed: pip install '.[gpu]' on a "
            "CUDA machine, or set model.transformer_impl=local (FP8 GEMMs through torch._scaled_mm)"
        )
    found = importlib.metadata.version("transformer_engine")
    if _version(found) < _version(need):
        raise UserError(f"{what} needs transformer-engine >= {need}, found {found}")
    if device.type != "cuda":
        raise UserError(f"{what} needs a CUDA GPU, this run is on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < TE_CAPABILITY[fp8.recipe]:
        need_cc = ".".join(map(str, TE_CAPABILITY[fp8.recipe]))
        raise UserError(
            f"{what} needs compute capability >= {need_cc}; {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}"
        )


def _check_scaled_mm(fp8: Fp8Config, device: torch.device) -> None:
    """Runs one FP8 linear forward and backward on `device`: torch._scaled_mm with these dtypes and
    scales either works there (CPUs, GPUs of compute capability 8.9+) or the run is refused."""
    gemms = gemms_for(fp8)
    x = torch.ones(16, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(16, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        Fp8LinearFunction.apply(x, w, None, gemms, _Splits.of(True, None, None)).sum().backward()
    except RuntimeError as exc:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"fp8.recipe = {fp8.recipe}, fp8.format = {fp8.format} on the local spec: torch._scaled_mm cannot run "
            f"on {where} ({reason}); FP8 GEMMs need a CPU or a GPU of compute capability >= 8.9"
        ) from None


# --------------------------------------------------------------------------------------- reporting


def describe(fp8: Fp8Config, model: ModelConfig) -> str:
    """The first log line of an FP8 run: what runs in FP8, how it is scaled, by what, in which layers."""
    formats = "e4m3 forward, e5m2 gradients" if fp8.format == "hybrid" else "e4m3 forward and gradients"
    if model.transformer_impl == "transformer_engine":
        how = f"transformer-engine, {fp8.recipe} recipe"
    else:
        how = f"local spec, torch._scaled_mm, {fp8.recipe} current scaling"
    layers = _ranges([n for n in range(1, model.num_layers + 1) if fp8_layer(fp8, n, model.num_layers)])
    params = "; FP8 primary weights" if fp8.params else ""
    return f"fp8: bf16 training with FP8 GEMMs in decoder layers {layers} ({how}; {fp8.format}: {formats}{params})"


def linear_places(chunks: list[torch.nn.Module]) -> tuple[set[tuple[int, str]], set[tuple[int, str]]]:
    """This rank's column- and row-parallel linears as (global layer number or 0 outside the decoder
    layers, place), in FP8 and in bf16: (3, 'self_attention.linear_qkv'), (0, 'output_layer');
    routed experts are one place ('mlp.experts.linear_fc1')."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    linears = (ColumnParallelLinear, RowParallelLinear)
    fp8: set[tuple[int, str]] = set()
    bf16: set[tuple[int, str]] = set()
    for chunk in chunks:
        layer_of: dict[int, int] = {}
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                layer_of.update({id(sub): module.layer_number for sub in module.modules()})
        for name, module in chunk.named_modules():
            if isinstance(module, linears):
                place = re.sub(r"^(module\.)+", "", re.sub(r"^.*\.layers\.\d+\.", "", name))
                place = re.sub(r"\.local_experts\.\d+\.", ".", place)
                (fp8 if isinstance(module, _Fp8Linear) else bf16).add((layer_of.get(id(module), 0), place))
    return fp8, bf16


def summarize(fp8: set[tuple[int, str]], bf16: set[tuple[int, str]]) -> str:
    """One line naming the linears whose GEMMs run in FP8 and those left in bf16, by layer ranges."""
    return f"fp8 GEMMs in {len(fp8)} linears: {_by_layers(fp8) or 'none'}; bf16 GEMMs: {_by_layers(bf16) or 'none'}"


def _by_layers(places: set[tuple[int, str]]) -> str:
    layers_of: dict[str, list[int]] = {}
    for layer, place in sorted(places):
        layers_of.setdefault(place, []).append(layer)
    groups: dict[str, list[str]] = {}
    for place, layers in layers_of.items():
        key = "" if layers == [0] else ("layer " if len(layers) == 1 else "layers ") + _ranges(layers)
        groups.setdefault(key, []).append(place)
    return "; ".join(f"{key}: {', '.join(p)}" if key else ", ".join(p) for key, p in groups.items())


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)

"""Tensor-parallel communication overlap (`parallel.tp_comm_overlap`): transformer-engine's
userbuffers, set up once per process after the process groups and before the model is built.

With it on, megatron-core's TransformerConfig.tp_comm_overlap (parallel/layout.py) makes each
transformer-engine linear split its sequence-parallel all-gather or reduce-scatter into chunks that
run beside the chunks of its GEMM (TE's defaults: a ring exchange over the tensor ranks for the
QKV/fc1 forward and the projection/fc2 data gradient, a pipeline of 4 splits for the
projection/fc2 forward reduce-scatter, bulk overlap in the QKV/fc1 backward). The linears look
their communicator up by name, so the userbuffers must exist first: one [s·b/cp, h] buffer per
overlapped GEMM, registered over the tensor-parallel ranks. Megatron-LM does the same in
`training/initialize.py` (`_initialize_tp_communicators`), with TE's default per-GEMM settings
unless a YAML file overrides them; this project uses TE's defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.errors import RecipeError

if TYPE_CHECKING:
    import torch


def userbuffer_shape(seq_length: int, micro_batch_size: int, context: int, hidden_size: int) -> list[int]:
    """The [tokens, hidden] shape of one userbuffer: a micro-batch's whole (tensor-gathered) sequence
    shard on one context rank, as the all-gathered input of the QKV and fc1 GEMMs is."""
    return [seq_length * micro_batch_size // context, hidden_size]


def check_recipe(tp_comm_overlap: bool, transformer_impl: str) -> None:
    """The layers it needs (parallel.check already asked for sequence parallelism)."""
    if tp_comm_overlap and transformer_impl != "transformer_engine":
        raise RecipeError(
            f"parallel.tp_comm_overlap = true runs on transformer-engine's userbuffers: set "
            f"model.transformer_impl = transformer_engine (got {transformer_impl})"
        )


def check_runtime(device: torch.device) -> Any:
    """transformer-engine's module package, or the one-line reason it cannot run here."""
    if device.type != "cuda":
        raise RecipeError(
            f"parallel.tp_comm_overlap = true needs CUDA GPUs (transformer-engine userbuffers), "
            f"this run is on {device.type}: set parallel.tp_comm_overlap = false"
        )
    try:
        from transformer_engine.pytorch import module as te_module
    except ImportError:
        raise RecipeError(
            "parallel.tp_comm_overlap = true needs transformer-engine, which is not installed: "
            "pip install '.[gpu]' on a CUDA machine, or set parallel.tp_comm_overlap = false"
        ) from None
    return te_module


def quantization_modes(fp8: bool, bf16_layers: int) -> list[bool]:
    """The userbuffer sets transformer-engine registers, one per GEMM input precision its linears
    ask for (True: FP8, whose all-gather buffers are one byte; False: the compute dtype): FP8 runs
    with fp8.first_last_layers_bf16 also need the plain set, which those bf16 layers look their
    communicators up in (TE's get_ub keys them by name and use_fp8), as Megatron-LM's
    _initialize_tp_communicators registers it."""
    return [fp8] + ([False] if fp8 and bf16_layers > 0 else [])


def initialize_userbuffers(
    te_module: Any, shape: list[int], tensor: int, fp8: bool, dtype: torch.dtype, bf16_layers: int = 0
) -> None:
    """Registers TE's userbuffer communicators over the tensor-parallel ranks (collective: every
    rank calls it). Bootstrapped over NCCL through torch.distributed, as Megatron-LM's default
    (`--tp-comm-bootstrap-backend nccl`); FP8 runs get FP8 all-gather buffers, and with
    `bf16_layers` (fp8.first_last_layers_bf16) a second, plain set (quantization_modes)."""
    mode = getattr(te_module.base, "UserBufferQuantizationMode", None)
    if mode is None:  # transformer-engine before 2.7: one set, chosen by use_fp8
        te_module.base.initialize_ub(shape=shape, tp_size=tensor, use_fp8=fp8, dtype=dtype, bootstrap_backend="nccl")
        return
    modes = [mode.FP8 if quantized else mode.NONE for quantized in quantization_modes(fp8, bf16_layers)]
    te_module.base.initialize_ub(
        shape=shape, tp_size=tensor, quantization_modes=modes, dtype=dtype, bootstrap_backend="nccl"
    )

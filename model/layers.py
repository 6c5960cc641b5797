"""Local-spec layers megatron-core lacks on CPU: a sequence-parallel RMSNorm and per-layer seeded
initialization (the SDPA core attention is model/attention/sdpa.py)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with megatron-core's norm constructor, usable under sequence parallelism.

    Under sequence parallelism each TP rank normalizes its own sequence slice, so the weight's
    gradient is partial; the `sequence_parallel` attribute makes megatron-core's
    `finalize_model_grads` all-reduce it over the tensor-parallel group (megatron-core's own
    WrappedTorchNorm refuses sequence parallelism outright: transformer/torch_norm.py:32).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused: Any):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


class SeededTransformerLayer(TransformerLayer):
    """A TransformerLayer whose weights are drawn from a generator seeded by its global index.

    megatron-core draws every weight from one stream in construction order, so the layers of
    pipeline stage 2 get the numbers stage 1 would have used: a different model per pipeline
    size. Reseeding with (init_seed, global layer number) before each layer makes the
    initialization, and so the whole loss curve, independent of pipeline and virtual-pipeline
    sizes; tensor parallelism is already invariant through CPU initialization of full weights.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Any,
        layer_number: int = 1,
        *args: Any,
        init_seed: int = 0,
        vp_stage: int | None = None,
        **kwargs: Any,
    ):
        offset = get_transformer_layer_offset(config, vp_stage)
        torch.manual_seed(derive_seed(init_seed, layer_number + offset))
        super().__init__(config, submodules, layer_number, *args, vp_stage=vp_stage, **kwargs)


def derive_seed(base: int, index: int) -> int:
    """A seed for item `index` (a global layer, an expert, a step) of a stream seeded `base`."""
    return (base * 1_000_003 + index) % (2**63)

"""`train.precision` read once: the dtype the model computes in and the flags megatron-core's model,
optimizer and the step take from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The training precision and what follows from it (the trainer builds one and hands it to the
    model builder, the optimizer and the step)."""

    name: Literal["fp32", "bf16", "fp16"] = "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' and activations' dtype inside the model (TransformerConfig.params_dtype)."""
        return _DTYPES[self.name]

    @property
    def half(self) -> bool:
        """bf16 or fp16: the model runs inside megatron-core's Float16Module, with fp32 master weights."""
        return self.name != "fp32"

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def fp16(self) -> bool:
        """fp16: a dynamic loss scale, whose overflows megatron-core's optimizer finds (and skips) itself."""
        return self.name == "fp16"

"""RoPE frequency scaling for long context (Llama-3.1's llama3 type): the `model.rope_scaling` keys,
their check, and their application to a built model's rotary embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.errors import RecipeError
from common.schema import PositiveFloat, PositiveInt


@dataclass
class RopeScalingConfig:
    """Rotary-frequency scaling for long context; type none = plain RoPE (rotary_base only)."""

    # llama3: Llama-3.1's scaling (low frequencies divided by factor, high ones kept, a smooth ramp
    # between the two wavelength bounds original_context / low_freq_factor and / high_freq_factor)
    type: Literal["none", "llama3"] = "none"
    factor: PositiveFloat = 8.0  # llama3: divisor of the low frequencies
    low_freq_factor: PositiveFloat = 1.0  # llama3: wavelengths above original_context / this are scaled
    high_freq_factor: PositiveFloat = 4.0  # llama3: wavelengths below original_context / this are kept
    original_context: PositiveInt = 8192  # llama3: the context (tokens) the frequencies were trained for


def check_rope_scaling(scaling: RopeScalingConfig) -> None:
    if scaling.type == "llama3" and scaling.high_freq_factor <= scaling.low_freq_factor:
        raise RecipeError(
            f"model.rope_scaling.high_freq_factor = {scaling.high_freq_factor} must exceed "
            f"model.rope_scaling.low_freq_factor = {scaling.low_freq_factor}"
        )


def scale_rope(chunk: Any, scaling: RopeScalingConfig) -> None:
    """Applies `model.rope_scaling` to the chunk's rotary frequencies, with megatron-core's own
    Llama-3.1 formula (RotaryEmbedding._apply_scaling, the same as transformers' llama3 rope).

    GPTModel's `rope_scaling=True` passes only the factor to that formula, which then uses its
    defaults for the other three values (low_freq_factor 1, high_freq_factor 4, original context
    8192: Llama-3.1's), so a model with other values would silently get Llama-3.1's. Here the
    formula gets all four, from the unscaled frequencies GPTModel built."""
    if scaling.type == "none":
        return
    rope = chunk.rotary_pos_emb
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_context,
    )

"""RoPE frequency scaling for long context (Llama-3.1's llama3 type; DeepSeek-V3's yarn, which
megatron-core's MLA applies itself): the `model.rope_scaling` keys, their check, and the llama3
scaling of a built model's rotary embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from common.errors import RecipeError
from common.schema import NonNegativeFloat, PositiveFloat, PositiveInt


@dataclass
class RopeScalingConfig:
    """Rotary-frequency scaling for long context; type none = plain RoPE (rotary_base only)."""

    # llama3: Llama-3.1's scaling (low frequencies divided by factor, high ones kept, a smooth ramp
    # between the two wavelength bounds original_context / low_freq_factor and / high_freq_factor)
    # yarn: YaRN as DeepSeek-V3 uses it (model.attention = mla only): frequencies between the two
    # correction bounds (beta_fast, beta_slow rotations over original_context) ramp from kept to
    # divided by factor; cos/sin times mscale's factor over mscale_all_dim's, the softmax scale times
    # mscale_all_dim's factor squared (a factor of m: 0.1 · m · ln(factor) + 1)
    type: Literal["none", "llama3", "yarn"] = "none"
    factor: PositiveFloat = 8.0  # llama3: divisor of the low frequencies; yarn: context extension factor
    low_freq_factor: PositiveFloat = 1.0  # llama3: wavelengths above original_context / this are scaled
    high_freq_factor: PositiveFloat = 4.0  # llama3: wavelengths below original_context / this are kept
    original_context: PositiveInt = 8192  # llama3, yarn: the context (tokens) the frequencies were trained for
    beta_fast: PositiveFloat = 32.0  # yarn: rotations over original_context above which a frequency is kept
    beta_slow: PositiveFloat = 1.0  # yarn: rotations below which it is divided by factor
    mscale: NonNegativeFloat = 1.0  # yarn: the rotary part's magnitude factor (over mscale_all_dim's)
    mscale_all_dim: NonNegativeFloat = 0.0  # yarn: the softmax scale's factor, squared; 0 = none


def check_rope_scaling(scaling: RopeScalingConfig) -> None:
    if scaling.type == "llama3" and scaling.high_freq_factor <= scaling.low_freq_factor:
        raise RecipeError(
            f"model.rope_scaling.high_freq_factor = {scaling.high_freq_factor} must exceed "
            f"model.rope_scaling.low_freq_factor = {scaling.low_freq_factor}"
        )
    if scaling.type == "yarn" and scaling.beta_fast <= scaling.beta_slow:
        raise RecipeError(
            f"model.rope_scaling.beta_fast = {scaling.beta_fast} must exceed "
            f"model.rope_scaling.beta_slow = {scaling.beta_slow}"
        )


def scale_rope(chunk: Any, scaling: RopeScalingConfig) -> None:
    """Applies `model.rope_scaling` to the chunk's rotary frequencies, with megatron-core's own
    Llama-3.1 formula (RotaryEmbedding._apply_scaling, the same as transformers' llama3 rope).

    GPTModel's `rope_scaling=True` passes only the factor to that formula, which then uses its
    defaults for the other three values (low_freq_factor 1, high_freq_factor 4, original context
    8192: Llama-3.1's), so a model with other values would silently get Llama-3.1's. Here the
    formula gets all four, from the unscaled frequencies GPTModel built."""
    if scaling.type != "llama3":  # yarn: MLA's own rotary embedding (model/attention/mla.py)
        return
    rope = chunk.rotary_pos_emb
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_context,
    )

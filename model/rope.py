"""RoPE frequency scaling for long context (Llama-3.1's llama3 type; DeepSeek-V3's yarn, which
megatron-core's MLA applies itself): the `model.rope_scaling` keys, their check, and the llama3
scaling of a built model's rotary embedding; their Hugging Face config.json spelling."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import RecipeError, UserError
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


# ------------------------------------------------------------------------------ config.json

_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor"}
    | {"original_max_position_embeddings"},
    "yarn": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast"}
    | {"beta_slow", "mscale", "mscale_all_dim", "truncate"},
}


def rope_from_hf(hf: Mapping) -> tuple[float, RopeScalingConfig]:
    """(theta, scaling) from either spelling: `rope_theta` + `rope_scaling` (the hub's Llama-3.1,
    transformers 4) or `rope_parameters` (transformers 5)."""
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], Mapping):
            raise UserError(f"config.json: {key} must be an object, got {hf[key]!r}")
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if params.get("partial_rotary_factor") == 1.0:  # rotary over whole heads, as ours
        del params["partial_rotary_factor"]
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in _ROPE_KEYS:
        raise UserError(f"config.json: rope type {kind!r} is not supported (default | llama3 | yarn)")
    extra = sorted(set(params) - _ROPE_KEYS[kind])
    if extra:
        raise UserError(f"config.json: rope fields {extra} not supported with rope type {kind!r}")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise UserError("config.json: no rope_theta (neither at the top nor in rope_parameters)")
    if kind == "default":
        return float(theta), RopeScalingConfig()
    if kind == "yarn":
        return float(theta), _yarn(params)
    try:
        scaling = RopeScalingConfig(
            type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_context=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise UserError(f"config.json: llama3 rope scaling without {exc}") from None
    return float(theta), scaling


def _yarn(params: Mapping) -> RopeScalingConfig:
    """transformers' YaRN (DeepSeek-V3's attention): cos/sin times mscale's factor over mscale_all_dim's
    when both are set, else the plain factor (mscale ignored: mscale = 1 here); the softmax scale times
    mscale_all_dim's factor squared when it is set. Beyond that, refused."""
    if params.get("truncate", True) is not True:
        raise UserError(f"config.json: yarn truncate = {params['truncate']!r} is not supported (only True)")
    if "factor" not in params or "original_max_position_embeddings" not in params:
        raise UserError("config.json: yarn rope scaling needs factor and original_max_position_embeddings")
    mscale, all_dim = float(params.get("mscale") or 0.0), float(params.get("mscale_all_dim") or 0.0)
    if all_dim and not mscale:
        raise UserError("config.json: yarn mscale_all_dim without mscale is not supported")
    return RopeScalingConfig(
        type="yarn",
        factor=float(params["factor"]),
        original_context=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=mscale if all_dim else 1.0,
        mscale_all_dim=all_dim,
    )


def rope_to_hf(rotary_base: float, s: RopeScalingConfig) -> dict[str, Any]:
    """The hub's spelling (`rope_theta`, `rope_scaling`), which transformers 4 and 5 both read."""
    out: dict[str, Any] = {"rope_theta": rotary_base, "rope_scaling": None}
    if s.type == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_context,
        }
    elif s.type == "yarn":
        if not s.mscale_all_dim and s.mscale != 1.0:
            raise UserError(f"cannot export yarn mscale = {s.mscale} without mscale_all_dim (transformers ignores it)")
        out["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": s.factor,
            "original_max_position_embeddings": s.original_context,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
            **({"mscale": s.mscale, "mscale_all_dim": s.mscale_all_dim} if s.mscale_all_dim else {}),
        }
    return out

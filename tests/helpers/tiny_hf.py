"""Tiny Hugging Face models, built locally (tests never download): tiny_gpt's architecture as a
Llama, and a small Mixtral."""

from __future__ import annotations

from typing import Any


def llama_config(vocab_size: int, **changes: Any) -> Any:
    """tiny_gpt's architecture (4 layers, h64, SwiGLU 176, 4 heads / 2 groups), as a Llama."""
    import transformers

    return transformers.LlamaConfig(
        **(_common(vocab_size) | dict(intermediate_size=176, num_hidden_layers=4) | changes)
    )


def mixtral_config(vocab_size: int, **changes: Any) -> Any:
    """2 layers of 4 experts (top-2), each a SwiGLU of 48."""
    import transformers

    return transformers.MixtralConfig(
        **(
            _common(vocab_size)
            | dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
            | changes
        )
    )


def _common(vocab_size: int) -> dict[str, Any]:
    return dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )

"""model/generation.py's sampler against transformers' logits warpers, the streamed text of
tools/generate.py, and the decode step of SDPAttention (one query against the whole KV cache)."""

import pytest
import torch

from model.generation import Sampling, filter_logits, sample

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")


def _logits() -> torch.Tensor:
    logits = torch.randn(4, 384, generator=torch.Generator().manual_seed(0)) * 3
    logits[:, 257:] = float("-inf")  # padded ids, as the model hands them over
    return logits


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (0.5, 40, 0.8), (1.3, 1000, 0.95)]
)
def test_filter_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    logits = _logits()
    expected = warpers(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    got = filter_logits(logits, Sampling(temperature, top_k, top_p))
    kept = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), kept) and kept.sum() >= 4
    torch.testing.assert_close(got[kept], expected[kept])
    if top_k or top_p < 1.0:
        assert (kept.sum(-1) < 257).all()  # the filters did filter


def test_greedy_is_argmax_and_padded_ids_are_never_drawn():
    logits = _logits()
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, Sampling(temperature=0), generator), logits.argmax(-1))
    draws = torch.stack([sample(logits, Sampling(temperature=5.0), generator) for _ in range(200)])
    assert draws.max() < 257 and len(draws.unique()) > 50


def test_same_seed_same_draws():
    logits = _logits()
    a = [sample(logits, Sampling(), torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def _generate_script():
    import tools.generate

    return tools.generate


def test_stream_holds_back_a_character_split_over_ids():
    import io

    from data.tokenizer import ByteTokenizer

    out = io.StringIO()
    stream = _generate_script().TextStream(ByteTokenizer(), out)
    seen = []
    for byte in "aé€b".encode():
        stream.add(byte)
        seen.append(out.getvalue())
    stream.add(256)  # EOD: no text
    stream.finish()
    assert seen == ["a", "a", "aé", "aé", "aé", "aé€", "aé€b"]
    assert out.getvalue() == "aé€b\n"


@pytest.mark.usefixtures("megatron_single_process")
def test_decode_step_attends_to_the_whole_cache():
    """megatron-core's static generation calls the core attention with one new query per step and
    mask type no_mask: the output equals the last row of causal attention over the whole sequence."""
    from megatron.core.transformer.enums import AttnMaskType

    from model.attention.sdpa import SDPAttention
    from model.config import ModelConfig
    from model.gpt import ModelBuild, transformer_config

    model = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)
    attention = SDPAttention(
        transformer_config(model, ModelBuild()),
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
    ).eval()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 1, 4, 16, generator=g)  # [s, b, heads, d]
    k, v = (torch.randn(9, 1, 2, 16, generator=g) for _ in range(2))  # 2 query groups
    whole = attention(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    last = attention(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask)
    torch.testing.assert_close(last, whole[-1:])
    assert not torch.allclose(attention(q[-1:], k, v, None, attn_mask_type=AttnMaskType.causal), whole[-1:])

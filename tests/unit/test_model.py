"""model/: parameter counts against real builds and a hand count; SDPA core attention against
megatron-core's score-matrix DotProductAttention; RMSNorm against torch; a whole-model forward."""

import dataclasses
import math
import re
import types

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.gpt import (
    ModelBuild,
    build_model_chunks,
    meta_device,
    padded_vocab_size,
    parameter_counts,
    transformer_config,
)
from pretrain.recipe import load_recipe

BYTE_VOCAB = 257  # the byte tokenizer tiny_gpt trains with (vocab_size: null in its recipe)
LLAMA_31_70B_PARAMETERS = 70_553_706_496  # published Llama-3.1-70B count


pytestmark = pytest.mark.usefixtures("megatron_single_process")


def _tiny():
    return load_recipe("tiny_gpt").model


def _built_parameter_count(model: ModelConfig, vocab: int) -> int:
    local = dataclasses.replace(model, transformer_impl="local")  # same parameters as TE's spec
    with meta_device():
        chunks = build_model_chunks(local, ModelBuild(perform_initialization=False), vocab)
    assert len(chunks) == 1
    return sum(p.numel() for p in chunks[0].parameters())  # parameters() counts a tied weight once


# ------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"untie_embeddings": False},
        {"num_query_groups": None},
    ],
    ids=["tiny_gpt", "tied", "mha"],
)
def test_formula_equals_built_model_tiny(change):
    model = dataclasses.replace(_tiny(), **change)
    vocab = padded_vocab_size(model, BYTE_VOCAB, tensor=1)
    assert parameter_counts(model, vocab).total == _built_parameter_count(model, vocab)


def test_formula_variants_differ():
    """The three tiny variants really are different models (guards the parametrization above)."""
    tiny = _tiny()
    counts = {
        parameter_counts(dataclasses.replace(tiny, **change), 384).total
        for change in ({}, {"untie_embeddings": False}, {"num_query_groups": None})
    }
    assert len(counts) == 3


def test_formula_equals_hand_count_tiny():
    m = _tiny()
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (
        4,
        64,
        176,
        4,
        2,
    )
    vocab = padded_vocab_size(m, BYTE_VOCAB, tensor=1)
    assert vocab == 384
    hidden, ffn, head_dim = 64, 176, 64 // 4
    q_proj = hidden * (4 * head_dim)
    k_proj = hidden * (2 * head_dim)  # 2 query groups share keys and values
    v_proj = hidden * (2 * head_dim)
    o_proj = (4 * head_dim) * hidden
    gate, up, down = hidden * ffn, hidden * ffn, ffn * hidden
    norms = hidden + hidden  # input and pre-MLP RMSNorm weights
    per_layer = q_proj + k_proj + v_proj + o_proj + gate + up + down + norms
    assert per_layer == 4096 + 2048 + 2048 + 4096 + 3 * 11264 + 128
    expected = 4 * per_layer + hidden + vocab * hidden + hidden * vocab  # final norm, embedding, output
    assert expected == 234_048
    assert parameter_counts(m, vocab).total == expected


def test_llama70b_is_the_published_count():
    model = load_recipe("llama70b").model
    assert model.vocab_size == 128256
    vocab = padded_vocab_size(model, model.vocab_size, tensor=1)
    assert vocab == 128256
    assert parameter_counts(model, vocab).total == LLAMA_31_70B_PARAMETERS
    assert _built_parameter_count(model, vocab) == LLAMA_31_70B_PARAMETERS


# --------------------------------------------------------------------------------------- attention


def _attention_pair(heads: int, groups: int, head_dim: int):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from model.attention.sdpa import SDPAttention

    model = ModelConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        ffn_hidden_size=4 * heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
    )
    config = transformer_config(model, ModelBuild())
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(**kwargs), DotProductAttention(**kwargs)


def _qkv(s, b, heads, groups, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, head_dim, generator=g, requires_grad=True)
    k = torch.randn(s, b, groups, head_dim, generator=g, requires_grad=True)
    v = torch.randn(s, b, groups, head_dim, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_sdpa_attention_equals_megatron_dot_product_attention(heads, groups):
    s, b, head_dim = 32, 2, 16
    sdpa, reference = _attention_pair(heads, groups, head_dim)
    q, k, v = _qkv(s, b, heads, groups, head_dim)
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True = masked

    out = sdpa(q, k, v, None)
    ref = reference(q, k, v, causal)
    assert out.shape == ref.shape == (s, b, heads * head_dim)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m, where=f"d{name}": f"{where}: {m}")


def test_sdpa_attention_is_causal():
    """A future key must not change earlier outputs (guards against a mask that was silently dropped)."""
    s, b, heads, groups, head_dim = 8, 1, 4, 2, 16
    sdpa, _ = _attention_pair(heads, groups, head_dim)
    q, k, v = (t.detach() for t in _qkv(s, b, heads, groups, head_dim))
    k2, v2 = k.clone(), v.clone()
    k2[-1] += 1.0
    v2[-1] += 1.0
    out, out2 = sdpa(q, k, v, None), sdpa(q, k2, v2, None)
    torch.testing.assert_close(out[:-1], out2[:-1], rtol=0, atol=0)
    assert not torch.allclose(out[-1], out2[-1])


def test_sdpa_attention_refuses_query_key_layer_scaling():
    """Upstream rescales by the layer number inside its own softmax; one SDPA call cannot."""
    from megatron.core.transformer.enums import AttnMaskType

    from model.attention.sdpa import SDPAttention
    from model.gpt import ModelBuild, transformer_config

    config = transformer_config(ModelConfig(), ModelBuild())
    config.apply_query_key_layer_scaling = True
    message = "SDPAttention does not support apply_query_key_layer_scaling; set it to False"
    with pytest.raises(ValueError, match=re.escape(message)):
        SDPAttention(config, layer_number=2, attn_mask_type=AttnMaskType.causal, attention_type="self")


def test_sdpa_attention_rejects_what_it_does_not_implement():
    from megatron.core.transformer.enums import AttnMaskType

    s, b, heads, groups, head_dim = 4, 1, 4, 2, 16
    sdpa, _ = _attention_pair(heads, groups, head_dim)
    q, k, v = _qkv(s, b, heads, groups, head_dim)
    causal_only = "SDPAttention supports causal masks only, got "
    with pytest.raises(NotImplementedError, match=re.escape(f"{causal_only}{AttnMaskType.padding}")):
        sdpa(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(NotImplementedError, match=re.escape(f"{causal_only}{AttnMaskType.no_mask}")):
        sdpa(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    with pytest.raises(NotImplementedError, match=re.escape(f"{causal_only}{AttnMaskType.causal}")):
        sdpa(q, k, v, mask)
    unsupported = "SDPAttention supports neither packed sequences nor bias"
    with pytest.raises(NotImplementedError, match=re.escape(unsupported)):
        sdpa(q, k, v, None, attention_bias=torch.zeros(1, heads, s, s))
    with pytest.raises(NotImplementedError, match=re.escape(unsupported)):
        sdpa(q, k, v, None, packed_seq_params=object())


# ----------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_rms_norm_equals_torch_and_marks_sequence_parallel(sequence_parallel):
    from model.layers import RMSNorm

    hidden, eps = 64, 1e-5
    config = types.SimpleNamespace(params_dtype=torch.float32, sequence_parallel=sequence_parallel)
    norm = RMSNorm(config, hidden, eps=eps)
    assert norm.weight.dtype == torch.float32
    assert norm.weight.sequence_parallel is sequence_parallel
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
    x = torch.randn(6, 2, hidden, generator=g) * 3.0  # [s, b, h]
    expected = F.rms_norm(x, (hidden,), norm.weight, eps)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-6)
    by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
    torch.testing.assert_close(norm(x), by_hand, rtol=1e-5, atol=1e-6)


def test_rms_norm_in_the_megatron_config_follows_sequence_parallel():
    from model.layers import RMSNorm

    config = transformer_config(ModelConfig(), ModelBuild())
    assert config.sequence_parallel is False
    norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
    assert norm.weight.sequence_parallel is False
    assert norm.eps == config.layernorm_epsilon


# ----------------------------------------------------------------------------------- whole model


def _build_tiny(seed: int):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    vocab = padded_vocab_size(_tiny(), BYTE_VOCAB, tensor=1)
    (chunk,) = build_model_chunks(_tiny(), ModelBuild(init_seed=seed), BYTE_VOCAB)
    return chunk, vocab


def test_tiny_gpt_uses_our_layers():
    from model.attention.sdpa import SDPAttention
    from model.layers import RMSNorm

    model, _ = _build_tiny(1234)
    eps = _tiny().norm_epsilon
    layers = list(model.decoder.layers)
    assert len(layers) == _tiny().num_layers
    for layer in layers:
        assert type(layer.self_attention.core_attention) is SDPAttention
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            assert type(norm) is RMSNorm and norm.eps == eps
    assert type(model.decoder.final_layernorm) is RMSNorm and model.decoder.final_layernorm.eps == eps


def test_tiny_gpt_initial_loss_is_log_vocab():
    """257 byte ids padded to 384 rows: the loss is the cross entropy over the 257 real ids only
    (about log 257 at init, not log 384), the padded logits are -inf, and the padded rows of the
    output layer get no gradient."""
    model, vocab = _build_tiny(1234)
    b, s = 4, _tiny().seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, BYTE_VOCAB, (b, s + 1), generator=g)
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    losses = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])  # [b, s] per token
    losses.sum().backward()
    with torch.no_grad():
        model.eval()
        logits = model(tokens[:, :-1], position_ids, None)  # [b, s, vocab]
    assert losses.shape == (b, s)
    assert logits.shape == (b, s, vocab) and vocab == 384
    assert torch.all(logits[..., BYTE_VOCAB:] == float("-inf")) and torch.isfinite(logits[..., :BYTE_VOCAB]).all()
    assert abs(losses.mean().item() - math.log(BYTE_VOCAB)) < 0.1
    # The loss is the cross entropy of the model's own real-vocabulary logits against the shifted tokens.
    real = logits[..., :BYTE_VOCAB].reshape(-1, BYTE_VOCAB).float()
    reference = F.cross_entropy(real, tokens[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(losses.detach().reshape(-1), reference, rtol=1e-5, atol=1e-5)
    grad = model.output_layer.weight.grad
    assert grad[BYTE_VOCAB:].abs().max() == 0 and grad[:BYTE_VOCAB].abs().max() > 0


def test_tiny_gpt_init_is_deterministic_per_seed():
    first, _ = _build_tiny(1234)
    second, _ = _build_tiny(1234)
    other, _ = _build_tiny(4321)
    a, b, c = (dict(m.named_parameters()) for m in (first, second, other))
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Matrices are drawn from the seed (norm weights are ones whatever the seed).
    drawn = [n for n in a if a[n].dim() == 2]
    assert drawn and all(not torch.equal(a[n], c[n]) for n in drawn)


# ---------------------------------------------------------------------------------- vocab padding


@pytest.mark.parametrize(
    "vocab,divisible_by,tensor,expected",
    [
        (257, 128, 1, 384),
        (257, 128, 2, 384),  # the same at every tensor size dividing 128: the layout never changes the model
        (257, 128, 8, 384),
        (128256, 128, 8, 128256),
        (100, 4, 3, 108),  # lcm(4, 3) = 12
        (256, 128, 2, 256),
        (384, 128, 1, 384),
    ],
)
def test_padded_vocab_size(vocab, divisible_by, tensor, expected):
    model = ModelConfig(make_vocab_size_divisible_by=divisible_by)
    assert padded_vocab_size(model, vocab, tensor) == expected


class _Shard(torch.nn.Module):
    """Stands in for the output layer on one tensor-parallel rank: (logits shard, bias)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, hidden):
        return torch.zeros(hidden.size(0), 1, self.width), None


@pytest.mark.parametrize("tensor", [1, 2, 4, 8])
def test_padded_logits_are_masked_on_every_tensor_rank(tensor):
    """257 ids padded to 384: across the ranks' shards exactly the global columns 257..383 are -inf
    (at TP4 rank 2 holds both kinds, rank 3 only padding), and the gathered logits of generation too."""
    from model.gpt import mask_padded_logits

    padded = padded_vocab_size(ModelConfig(), BYTE_VOCAB, tensor)
    shards = []
    for rank in range(tensor):
        layer = _Shard(padded // tensor)
        mask_padded_logits(layer, BYTE_VOCAB, padded, rank)
        shards.append(layer(torch.zeros(3, 1))[0])
    logits = torch.cat(shards, dim=-1)  # [s, b, padded]
    assert padded == 384 and torch.equal(torch.isinf(logits[0, 0]), torch.arange(padded) >= BYTE_VOCAB)
    gathered = _Shard(padded)
    mask_padded_logits(gathered, BYTE_VOCAB, padded, tensor - 1)  # any rank: the whole vocabulary
    assert torch.equal(torch.isinf(gathered(torch.zeros(3, 1))[0][0, 0]), torch.arange(padded) >= BYTE_VOCAB)

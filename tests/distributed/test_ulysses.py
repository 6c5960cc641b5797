"""model/attention/ulysses.py: Ulysses attention (a2a) and a2a+p2p on 2 and 4 gloo processes against full-sequence
causal attention, grouped-query K/V split and copied; the core_attention module, its choice by
cp_comm_type and its refusals."""

import math
import re
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.attention import ulysses
from model.attention.ring import RingAttention
from model.attention.ulysses import UlyssesAttention, check_heads, ulysses_attention
from tests.helpers.spawn import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)
SCALE = 0.2  # not 1/sqrt(d), so a dropped scale shows
B, HEAD_DIM, SEQ = 2, 8, 64


def load_balanced_slice(x: torch.Tensor, cp_rank: int, cp: int, dim: int) -> torch.Tensor:
    """Chunks cp_rank and 2·cp−1−cp_rank of 2·cp equal chunks along `dim`, in that order."""
    chunks = x.chunk(2 * cp, dim)
    return torch.cat((chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]), dim)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _full_problem(heads: int, groups: int, v_dim: int = HEAD_DIM):
    """A model's full-sequence q [s, b, np, hn], k [s, b, ng, hn] and v [s, b, ng, v_dim] (v split out
    of a fused tensor, as megatron's QKV projection leaves it: not contiguous), the output gradient,
    and one full-sequence causal SDPA call's output and input gradients."""
    q = _randn(SEQ, B, heads, HEAD_DIM, seed=10)
    k = _randn(SEQ, B, groups, HEAD_DIM, seed=11)
    v = _randn(SEQ, B, groups, 3 * v_dim, seed=12)[..., v_dim : 2 * v_dim]
    dout = _randn(SEQ, B, heads, v_dim, seed=13)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in leaves), is_causal=True, scale=SCALE, enable_gqa=heads != groups
    ).permute(2, 0, 1, 3)
    grads = torch.autograd.grad(out, leaves, dout)
    return (q, k, v, dout), (out.detach(), *grads)


# (query heads, K/V heads[, value width]): K/V split (2 on 2 ranks), copied (2 or 1 on 4 ranks), MHA,
# and multi-latent attention's values narrower than its queries and keys
HEAD_CASES = ((4, 2), (4, 1), (8, 8), (4, 4, 4))


def _ulysses_results(a2a_group, ring_group, cp: int, cp_rank: int, heads: int, groups: int, v_dim=HEAD_DIM) -> list:
    """out, dq, dk, dv of this rank's load-balanced slices of the full problem."""
    (q, k, v, dout), _ = _full_problem(heads, groups, v_dim)
    shard = lambda t: load_balanced_slice(t, cp_rank, cp, dim=0)
    leaves = [shard(t).requires_grad_() for t in (q, k, v)]
    # a value split out of a fused projection: the same values, not contiguous
    value = torch.cat((torch.zeros_like(leaves[2]), leaves[2]), -1)[..., v_dim:]
    out = ulysses_attention(leaves[0], leaves[1], value, a2a_group, ring_group, SCALE)
    out.backward(shard(dout))
    return [out.detach()] + [t.grad for t in leaves]


def _on_every_rank(rank: int, world: int) -> dict:
    """On 4 ranks: a2a over all 4 and over two pairs, a2a 2 × p2p 2 (the all-to-all inside [0, 1]
    and [2, 3], the ring across them, as megatron-core's hierarchical groups), and, as a control,
    a2a over 4 with the chunks left in the order they arrive."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    rings = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    world_group, pair, ring = dist.group.WORLD, pairs[rank // 2], rings[rank % 2]
    results = {}
    for shape in HEAD_CASES:
        case = "/".join(map(str, shape))
        results[f"a2a4/{case}"] = _ulysses_results(world_group, None, 4, rank, *shape)
        results[f"a2a2/{case}"] = _ulysses_results(pair, None, 2, rank % 2, *shape)
        results[f"a2a2xp2p2/{case}"] = _ulysses_results(pair, ring, 4, rank, *shape)
    original = ulysses._received_order
    ulysses._received_order = lambda n, device: torch.arange(2 * n, device=device)  # as they arrive
    try:
        results["control-arrival-order/4/2"] = _ulysses_results(world_group, None, 4, rank, 4, 2)
    finally:
        ulysses._received_order = original
    return results


@pytest.mark.slow
def test_ulysses_and_a2a_p2p_equal_full_causal_attention():
    """One 4-process gloo world; every rank's slices of out, dq, dk, dv equal the same slices of one
    full-sequence SDPA call computed here, for K/V heads split over the all-to-all ranks, copied to
    them (fewer K/V heads than ranks) and MHA. The control (chunks not put in true order after the
    all-to-all) is far off: the test sees whether the load-balanced layout is reassembled."""
    per_rank = run_distributed(_on_every_rank, 4)
    expected = {case: _full_problem(*case)[1] for case in HEAD_CASES}
    for rank, results in enumerate(per_rank):
        control = results.pop("control-arrival-order/4/2")
        want = load_balanced_slice(expected[(4, 2)][0], rank, 4, dim=0)
        assert (control[0] - want).abs().max() > 0.1, "the control should be wrong"
        for case, got in results.items():
            layout, heads_case = case.split("/", 1)
            cp, cp_rank = (2, rank % 2) if layout == "a2a2" else (4, rank)
            shape = tuple(map(int, heads_case.split("/")))
            for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected[shape]):
                torch.testing.assert_close(
                    a,
                    load_balanced_slice(e, cp_rank, cp, dim=0),
                    **TOL,
                    msg=lambda m, where=f"rank {rank} {case} {name}": f"{where}: {m}",
                )


@pytest.mark.parametrize(
    "heads, groups, a2a, message",
    [
        (6, 2, 4, "Ulysses attention needs the query heads (6) divisible by the all-to-all size (4)"),
        (12, 6, 4, "Ulysses attention needs the K/V heads (6) and the all-to-all size (4) to divide one another"),
    ],
)
def test_head_counts_that_do_not_divide_are_refused(heads, groups, a2a, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_heads(heads, groups, a2a)


# ------------------------------------------------------------------ the core_attention module


def _attention_kwargs(context=1, comm="a2a", **model_changes):
    from megatron.core.transformer.enums import AttnMaskType

    from model.config import ModelConfig
    from model.gpt import ModelBuild, transformer_config
    from parallel.layout import Layout

    model = ModelConfig(
        num_layers=1,
        hidden_size=4 * HEAD_DIM,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        **model_changes,
    )
    a2a = context // 2 if comm == "a2a+p2p" else None
    layout = Layout(world_size=context, context=context, context_comm=comm, context_a2a=a2a)
    config = transformer_config(model, ModelBuild(layout=layout))
    return dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def test_ulysses_module_equals_sdp_attention(megatron_single_process):
    """At cp = 1 (an all-to-all of one rank) the core_attention equals SDPAttention in megatron's
    [s, b, np, hn] layout, value and gradients."""
    from model.attention.sdpa import SDPAttention

    module = UlyssesAttention(**_attention_kwargs(context=2))
    assert module.config.context_parallel_size == 2 and module.ring_group is None
    assert module.softmax_scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
    sdpa = SDPAttention(**_attention_kwargs())
    s = 32
    qkv = [_randn(s, B, n, HEAD_DIM, seed=20 + i).requires_grad_() for i, n in enumerate((4, 2, 2))]
    out, ref = module(*qkv, None), sdpa(*qkv, None)
    assert out.shape == (s, B, 4 * HEAD_DIM)
    torch.testing.assert_close(out, ref, **TOL)
    dout = _randn(*out.shape, seed=30)
    for got, want in zip(torch.autograd.grad(out, qkv, dout), torch.autograd.grad(ref, qkv, dout)):
        torch.testing.assert_close(got, want, **TOL)


def test_context_comm_selects_ulysses_or_the_ring(megatron_single_process):
    """Local layers at CP > 1: p2p builds the ring, a2a and a2a+p2p build Ulysses (whose a2a+p2p
    groups come from megatron-core's hierarchical CP groups: without them, a clear error)."""
    from model.config import ModelConfig
    from model.gpt import ModelBuild, layer_spec, transformer_config
    from parallel.layout import Layout

    model = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)
    built = {}
    for comm, a2a in (("p2p", None), ("a2a", None), ("a2a+p2p", 2)):
        layout = Layout(world_size=4, context=4, context_comm=comm, context_a2a=a2a)
        config = transformer_config(model, ModelBuild(layout=layout))
        assert config.cp_comm_type == comm and config.hierarchical_context_parallel_sizes == layout.hierarchical_context
        (layer,) = layer_spec(model, config).layer_specs
        built[comm] = layer.submodules.self_attention.submodules.core_attention
    assert built == {"p2p": RingAttention, "a2a": UlyssesAttention, "a2a+p2p": UlyssesAttention}
    with pytest.raises(ValueError, match=re.escape("cp_comm_type a2a+p2p needs megatron-core's two hierarchical")):
        UlyssesAttention(**_attention_kwargs(context=4, comm="a2a+p2p"))


def test_ulysses_module_refuses_what_it_does_not_implement(megatron_single_process):
    from megatron.core.transformer.enums import AttnMaskType

    s = 4
    q = _randn(s, 1, 4, HEAD_DIM, seed=0)
    k, v = _randn(s, 1, 2, HEAD_DIM, seed=1), _randn(s, 1, 2, HEAD_DIM, seed=2)
    module = UlyssesAttention(**_attention_kwargs(context=2))
    with pytest.raises(NotImplementedError, match="causal masks only"):
        module(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(NotImplementedError, match="neither packed sequences nor bias"):
        module(q, k, v, None, packed_seq_params=object())
    dropping = UlyssesAttention(**_attention_kwargs(context=2, attention_dropout=0.1))
    with pytest.raises(NotImplementedError, match="UlyssesAttention has no attention dropout, got 0.1"):
        dropping.train()(q, k, v, None)
    dropping.eval()(q, k, v, None)  # dropout is off in evaluation
    config = types.SimpleNamespace(num_attention_heads=6, num_query_groups=4)
    with pytest.raises(ValueError, match="divisible by num_query_groups"):
        UlyssesAttention(config, 1, None, "self")

"""model/attention/ring.py: block kernels against SDPA autograd; the ring on 2 and 4 gloo processes
against full-sequence causal attention; cp=1 and the core_attention module against SDPAttention."""

import math
import re
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.attention.kernels import (
    BACKENDS,
    CANDIDATES,
    BlockKernels,
    _backend_for,
    _verify,
    select_backend,
)
from model.attention.ring import RingAttention, RingAttentionFunction, _step_blocks
from tests.helpers.spawn import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)
SCALE = 0.2  # not 1/sqrt(d), so a dropped scale shows


def load_balanced_slice(x: torch.Tensor, cp_rank: int, cp: int, dim: int) -> torch.Tensor:
    """Chunks cp_rank and 2·cp−1−cp_rank of 2·cp equal chunks along `dim`, in that order."""
    chunks = x.chunk(2 * cp, dim)
    return torch.cat((chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]), dim)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ block kernels


@pytest.mark.parametrize("backend", ["math", "aten_cpu"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_block_kernels_equal_sdpa_autograd(backend, causal):
    b, h, sq, d = 2, 3, 8, 16
    sk = sq if causal else 12
    # row slices of larger tensors, as the ring passes them (not contiguous)
    q = _randn(b, h, 2 * sq, d, seed=0)[:, :, sq:].requires_grad_()
    k = _randn(b, h, sk + 4, d, seed=1)[:, :, 4:].requires_grad_()
    v = _randn(b, h, sk + 4, d, seed=2)[:, :, 4:].requires_grad_()
    dout = _randn(b, h, sq, d, seed=3)

    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=SCALE)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    scores = (q @ k.transpose(-2, -1) * SCALE).detach()
    if causal:
        scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))

    kernels = BACKENDS[backend]
    with torch.no_grad():
        out, lse = kernels.forward(q, k, v, causal, SCALE)
        grads = kernels.backward(dout, q, k, v, out, lse, causal, SCALE)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, sq)
    torch.testing.assert_close(out, ref.detach(), **TOL)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), **TOL)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, where=f"d{name}": f"{where}: {m}")


def test_cpu_uses_the_aten_kernels():
    """Guards against the probe silently falling back to plain math after a torch upgrade."""
    for dtype in (torch.float32, torch.bfloat16):
        for head_dim in (16, 128):
            assert select_backend(torch.zeros(1, 1, 2, head_dim, dtype=dtype)) == "aten_cpu", (dtype, head_dim)


@pytest.fixture
def fresh_backend_choice():
    _backend_for.cache_clear()
    yield
    _backend_for.cache_clear()


@pytest.mark.parametrize(
    "defect, message",
    [
        ("lse_base2", "lse differs from math by"),
        ("padded_lse", "lse has shape (2, 2, 96), math (2, 2, 64)"),
        ("causal_dropped_in_backward", "dq differs from math by"),
        ("raises", "RuntimeError: kernel not compiled for this device"),
        ("gqa_heads_strided", "out differs from math by"),
    ],
)
def test_a_wrongly_wired_kernel_is_never_selected(defect, message, monkeypatch, fresh_backend_choice):
    """Backends that cannot run in CI (CUDA, flash-attn) are used only once a probe against plain
    math passed; here the probe meets the ways such wiring goes wrong, on the CPU candidate."""
    good = BACKENDS["aten_cpu"]

    def forward(q, k, v, causal, scale):
        if defect == "gqa_heads_strided":  # K/V head j serves query heads j, j + ng, …: not megatron's order
            rep = q.size(1) // k.size(1)
            k, v = k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1)
        if defect == "raises":
            raise RuntimeError("kernel not compiled for this device\nsecond line")
        out, lse = good.forward(q, k, v, causal, scale)
        if defect == "lse_base2":
            lse = lse / math.log(2)
        if defect == "padded_lse":
            lse = F.pad(lse, (0, 32))
        return out, lse

    def backward(dout, q, k, v, out, lse, causal, scale):
        return good.backward(dout, q, k, v, out, lse, causal and defect != "causal_dropped_in_backward", scale)

    monkeypatch.setitem(BACKENDS, "aten_cpu", BlockKernels(forward, backward, gqa=defect == "gqa_heads_strided"))
    with pytest.warns(UserWarning, match=re.escape(message)) as warned:
        assert select_backend(torch.zeros(1, 1, 2, 16)) == "math"
    assert "not using the aten_cpu kernels for torch.float32, head size 16 on cpu" in str(warned[0].message)
    assert ("with 4 query heads on 2 K/V heads" in str(warned[0].message)) == (defect == "gqa_heads_strided")


def test_probe_accepts_a_correct_kernel_in_every_cpu_dtype(fresh_backend_choice):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert _verify("aten_cpu", torch.device("cpu"), dtype, 64) is None, dtype
        assert _verify("math", torch.device("cpu"), dtype, 64) is None, dtype


def test_fully_masked_quarter_blocks_are_skipped():
    half = 4  # cp=4, rank 1 holds chunks 1 and 6
    first, second = slice(0, half), slice(half, None)
    assert _step_blocks(0, 1, 4, half) == ((slice(None), slice(None), True),)
    # from rank 0 (chunks 0, 7): chunk 0, seen by our chunk 1 and our chunk 6
    assert _step_blocks(1, 1, 4, half) == ((first, first, False), (second, first, False))
    # from rank 3 (chunks 3, 4) and rank 2 (chunks 2, 5): both, seen by our chunk 6 only
    assert _step_blocks(2, 1, 4, half) == ((second, first, False), (second, second, False))
    assert _step_blocks(3, 1, 4, half) == ((second, first, False), (second, second, False))


def test_the_ring_keeps_a_models_layout():
    """A model's [s, b, h, d] tensors are used as they are; a value split out of the fused QKV
    projection (not dense) is copied in the same order of dims, so messages stay contiguous."""
    from model.attention.ring import _dense, _message

    q = _randn(6, 2, 3, 5, seed=0).permute(1, 2, 0, 3)  # [s, b, h, d] -> [b, h, s, d]
    assert _dense(q) is q and _message(q).is_contiguous()
    v = _randn(6, 2, 3, 4 * 5, seed=1)[..., 15:].permute(1, 2, 0, 3)  # last hn of [s, b, ng, 4·hn]
    copy = _dense(v)
    assert torch.equal(copy, v) and _message(copy).is_contiguous()
    assert copy.permute(2, 0, 1, 3).is_contiguous(), copy.stride()  # still [s, b, h, d] in memory


# ---------------------------------------------------------------------------------------- the ring

B, HEADS, GROUPS, HEAD_DIM, SEQ = 2, 4, 2, 16, 64
V_DIM_MLA = 8  # multi-latent attention: values narrower than queries and keys


def _full_problem(v_dim: int = HEAD_DIM):
    """Full-sequence q, k, v, dout and the reference output and gradients (SDPA, causal, GQA); values
    and output v_dim wide."""
    q = _randn(B, HEADS, SEQ, HEAD_DIM, seed=10).requires_grad_()
    k = _randn(B, GROUPS, SEQ, HEAD_DIM, seed=11).requires_grad_()
    v = _randn(B, GROUPS, SEQ, v_dim, seed=12).requires_grad_()
    dout = _randn(B, HEADS, SEQ, v_dim, seed=13)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (q.detach(), k.detach(), v.detach(), dout), (out.detach(), *grads)


def _ring_results(group, cp: int, cp_rank: int, v_dim: int = HEAD_DIM) -> dict:
    """The ring's out, dq, dk, dv on this rank's slices, for contiguous [b, h, s, d] inputs and for a
    model's [s, b, h, d] tensors seen as [b, h, s, d] (returned as [b, h, s, d]); checks that the
    output comes back in the input's layout."""
    (q, k, v, dout), _ = _full_problem(v_dim)
    shard = lambda t: load_balanced_slice(t, cp_rank, cp, dim=2)
    results = {}
    for layout in ("bhsd", "sbhd"):
        if layout == "bhsd":
            leaves = [shard(t).requires_grad_() for t in (q, k, v)]
            view = lambda t: t
        else:
            leaves = [shard(t).permute(2, 0, 1, 3).contiguous().requires_grad_() for t in (q, k, v)]
            view = lambda t: t.permute(1, 2, 0, 3)
        out = RingAttentionFunction.apply(*(view(t) for t in leaves), group, SCALE)
        out.backward(view(shard(dout).permute(2, 0, 1, 3).contiguous()) if layout == "sbhd" else shard(dout))
        if layout == "sbhd":  # a model's layer reshapes it to [s, b, h·d] without a copy
            assert out.permute(2, 0, 1, 3).is_contiguous(), f"cp={cp} rank {cp_rank}: out strides {out.stride()}"
        results[layout] = [out.detach().contiguous()] + [view(t.grad).contiguous() for t in leaves]
    return results


def _ring_on_every_rank(rank: int, world: int) -> dict:
    """On 4 ranks: the ring over all 4 and over two 2-rank groups, with the CPU kernel (native GQA)
    and with plain math (K/V heads folded or copied per query head); and over the pairs with values
    narrower than queries and keys (MLA), where the CPU kernel, which needs one head size, is not
    tried: plain math."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    results = {}
    for backend, candidates in (("aten_cpu", CANDIDATES["cpu"]), ("math", ())):
        CANDIDATES["cpu"] = candidates
        _backend_for.cache_clear()
        assert select_backend(torch.zeros(1, HEADS, 2, HEAD_DIM)) == backend
        results[(backend, 4)] = _ring_results(dist.group.WORLD, cp=4, cp_rank=rank)
        # ranks 2, 3 form a group whose local ranks differ from their global ones
        results[(backend, 2)] = _ring_results(pairs[rank // 2], cp=2, cp_rank=rank % 2)
    assert select_backend(torch.zeros(1, HEADS, 2, HEAD_DIM), V_DIM_MLA) == "math"
    results[("mla-widths", 2)] = _ring_results(pairs[rank // 2], cp=2, cp_rank=rank % 2, v_dim=V_DIM_MLA)
    return {
        f"{backend}/cp{cp}/{layout}": tensors
        for (backend, cp), by_layout in results.items()
        for layout, tensors in by_layout.items()
    }


@pytest.mark.slow
def test_ring_equals_full_causal_attention_cp2_cp4_gqa():
    """One 4-process gloo world; every rank's slices of out, dq, dk, dv equal the same slices of one
    full-sequence SDPA call computed here (with the softmax scale SCALE, so a scale taken from the
    value width would fail the unequal-width case)."""
    by_width = {width: _full_problem(width)[1] for width in (HEAD_DIM, V_DIM_MLA)}
    per_rank = run_distributed(_ring_on_every_rank, 4)
    for rank, results in enumerate(per_rank):
        for case, got in results.items():
            expected = by_width[V_DIM_MLA if case.startswith("mla-widths") else HEAD_DIM]
            cp = int(case.split("/")[1][2:])
            cp_rank = rank if cp == 4 else rank % 2
            for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
                torch.testing.assert_close(
                    a,
                    load_balanced_slice(e, cp_rank, cp, dim=2),
                    **TOL,
                    msg=lambda m, where=f"rank {rank} {case} {name}": f"{where}: {m}",
                )


# ------------------------------------------------------------------ cp = 1 and the core attention


def _attention_kwargs(heads=HEADS, groups=GROUPS, context=1, **model_changes):
    from megatron.core.transformer.enums import AttnMaskType

    from model.config import ModelConfig
    from model.gpt import ModelBuild, transformer_config
    from parallel.layout import Layout

    model = ModelConfig(
        num_layers=1,
        hidden_size=heads * HEAD_DIM,
        ffn_hidden_size=4 * heads * HEAD_DIM,
        num_attention_heads=heads,
        num_query_groups=groups,
        **model_changes,
    )
    config = transformer_config(model, ModelBuild(layout=Layout(world_size=context, context=context)))
    return dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cp1_function_equals_sdpa(megatron_single_process, dtype):
    from megatron.core import parallel_state

    (q, k, v, dout), expected = _full_problem()
    local = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = RingAttentionFunction.apply(*local, parallel_state.get_context_parallel_group(), SCALE)
    out.backward(dout.to(dtype))
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out.detach(), *(t.grad for t in local)), expected):
        assert a.dtype == dtype, f"{name} is {a.dtype}"
        torch.testing.assert_close(a.float(), e, **TOL, msg=lambda m, where=f"{dtype} {name}": f"{where}: {m}")


def test_ring_attention_module_equals_sdp_attention(megatron_single_process):
    """The core_attention at cp=1 equals SDPAttention, in megatron's [s, b, np, hn] layout;
    a config with context_parallel_size > 1 passes DotProductAttention's CP assertion."""
    from model.attention.sdpa import SDPAttention

    ring = RingAttention(**_attention_kwargs(context=2))
    assert ring.config.context_parallel_size == 2
    assert ring.softmax_scale == pytest.approx(1 / math.sqrt(HEAD_DIM))
    sdpa = SDPAttention(**_attention_kwargs())
    s = 32
    qkv = [_randn(s, B, n, HEAD_DIM, seed=20 + i).requires_grad_() for i, n in enumerate((HEADS, GROUPS, GROUPS))]
    out, ref = ring(*qkv, None), sdpa(*qkv, None)
    assert out.shape == (s, B, HEADS * HEAD_DIM)
    torch.testing.assert_close(out, ref, **TOL)
    dout = _randn(*out.shape, seed=30)
    for got, want in zip(torch.autograd.grad(out, qkv, dout), torch.autograd.grad(ref, qkv, dout)):
        torch.testing.assert_close(got, want, **TOL)


def test_heads_not_divisible_by_groups_is_a_clear_error():
    message = "ring attention needs num_attention_heads (6) divisible by num_query_groups (4)"
    q, kv = torch.zeros(1, 6, 4, 8), torch.zeros(1, 4, 4, 8)
    with pytest.raises(ValueError, match=re.escape(message)):
        RingAttentionFunction.apply(q, kv, kv, None, 1.0)
    config = types.SimpleNamespace(num_attention_heads=6, num_query_groups=4)
    with pytest.raises(ValueError, match=re.escape(message)):
        RingAttention(config, 1, None, "self")


def test_ring_attention_rejects_what_it_does_not_implement(megatron_single_process):
    from megatron.core.transformer.enums import AttnMaskType

    with pytest.raises(ValueError, match="apply_query_key_layer_scaling"):
        kwargs = _attention_kwargs()
        kwargs["config"].apply_query_key_layer_scaling = True
        RingAttention(**kwargs)
    s = 4
    q = _randn(s, 1, HEADS, HEAD_DIM, seed=0)
    k, v = _randn(s, 1, GROUPS, HEAD_DIM, seed=1), _randn(s, 1, GROUPS, HEAD_DIM, seed=2)
    ring = RingAttention(**_attention_kwargs())
    with pytest.raises(NotImplementedError, match="causal masks only"):
        ring(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(NotImplementedError, match="causal masks only"):
        ring(q, k, v, torch.ones(1, 1, s, s, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="neither packed sequences nor bias"):
        ring(q, k, v, None, packed_seq_params=object())
    dropping = RingAttention(**_attention_kwargs(attention_dropout=0.1))
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        dropping.train()(q, k, v, None)
    dropping.eval()(q, k, v, None)  # dropout is off in evaluation


def test_context_parallel_selects_the_ring_or_transformer_engine(megatron_single_process):
    """Local layers at CP > 1 get the ring as core attention; transformer_impl = transformer_engine
    hands CP to TE's attention with parallel.context_comm as its cp_comm_type (no TE here: the
    clear error is what a CPU user sees)."""
    import dataclasses

    from common.errors import UserError
    from model.config import ModelConfig
    from model.gpt import ModelBuild, layer_spec, transformer_config
    from parallel.layout import Layout

    model = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)
    ring_config = transformer_config(model, ModelBuild(layout=Layout(world_size=2, context=2)))
    assert ring_config.cp_comm_type == "p2p"
    spec = layer_spec(model, ring_config)
    (layer,) = spec.layer_specs
    assert layer.submodules.self_attention.submodules.core_attention is RingAttention
    te_model = dataclasses.replace(model, transformer_impl="transformer_engine")
    te_config = transformer_config(te_model, ModelBuild(layout=Layout(world_size=2, context=2, context_comm="a2a")))
    assert te_config.cp_comm_type == "a2a"
    with pytest.raises(
        UserError,
        match=re.escape("model.transformer_impl: transformer_engine needs transformer-engine, which is not installed"),
    ):
        layer_spec(te_model, te_config)

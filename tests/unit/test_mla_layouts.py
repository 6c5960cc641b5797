"""What multi-latent attention needs at other layouts, in one process: the context-parallel core
attentions (ring, Ulysses) take its value heads narrower than its query/key heads and keep the
softmax scale it gives them; selective recompute's mla_up_proj reruns exactly the up-projections."""

import pytest
import torch

from tests.unit.test_mla import _tiny_deepseek
from tests.unit.test_recompute import _forward_calls

pytestmark = pytest.mark.usefixtures("megatron_single_process")


@pytest.mark.parametrize("comm", ["p2p", "a2a"])
def test_context_parallel_attention_takes_unequal_widths(comm):
    """At cp = 1 (the group of one process) the ring and Ulysses modules equal SDPAttention, forward
    and backward, with q/k heads 24 wide, v heads 12 wide and a scale that is neither's 1/sqrt."""
    from megatron.core.transformer.enums import AttnMaskType

    from model.attention.ring import RingAttention
    from model.attention.sdpa import SDPAttention
    from model.attention.ulysses import UlyssesAttention
    from model.gpt import ModelBuild, transformer_config

    config = transformer_config(_tiny_deepseek(), ModelBuild())
    kwargs = dict(softmax_scale=0.3, k_channels=24, v_channels=12)
    cls = RingAttention if comm == "p2p" else UlyssesAttention
    ours = cls(config, 1, AttnMaskType.causal, "self", cp_comm_type=comm, **kwargs)
    reference = SDPAttention(config, 1, AttnMaskType.causal, "self", **kwargs)
    assert ours.softmax_scale == 0.3
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(8, 2, 4, width, generator=gen).requires_grad_() for width in (24, 24, 12)]  # [s, b, np, hn]
    out, want = ours(*qkv, None), reference(*qkv, None)
    assert out.shape == (8, 2, 4 * 12)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    dout = torch.randn(out.shape, generator=gen)
    for got, expected in zip(torch.autograd.grad(out, qkv, dout), torch.autograd.grad(want, qkv, dout)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mla_up_proj_reruns_the_up_projections():
    """Selective recompute of mla_up_proj runs each layer's two up-projections (column-parallel
    linears) once more in the backward, and nothing else (2 MLA layers: a dense one, an MoE one)."""
    two = ["model.num_layers=2"]
    selective = [*two, "model.recompute_granularity=selective", "model.recompute_modules=[mla_up_proj]"]
    plain, recomputed = _forward_calls("tiny_deepseek", two), _forward_calls("tiny_deepseek", selective)
    assert plain["ColumnParallelLinear"] > 4
    assert recomputed - plain == {"ColumnParallelLinear": 4}
    assert plain - recomputed == {}


def test_mla_up_proj_in_the_memory_model():
    """The memory model's kept bytes with mla_up_proj recomputed (q, k and v freed after the core
    attention) against what a real forward of tiny_deepseek's dense MLA layers keeps, as
    tests/unit/test_memory_mla.py checks it without (the core attention recomputed there too: on the
    CPU SDPA's math path keeps [s, s] scores). Negative control: the prediction without mla_up_proj
    keeps q, k and v and is far off what this forward keeps."""
    from planning.memory import chunk_bytes, setup_for
    from pretrain.recipe import load_recipe
    from tests.unit.test_memory import CPU, SCALARS, _saved_bytes

    def predicted(modules: str):
        recipe = load_recipe(
            "tiny_deepseek",
            ["model.seq_length=64", "model.moe.num_experts=null", "model.recompute_granularity=selective"]
            + [f"model.recompute_modules={modules}"],
        )
        setup = setup_for(recipe, 1, CPU)
        return recipe, chunk_bytes(setup, (0, recipe.model.num_layers), first=True, last=True).kept

    recipe, with_up_proj = predicted("[core_attn,mla_up_proj]")
    measured, bound = _saved_bytes(recipe, micro_batch=2), SCALARS * (recipe.model.num_layers + 1)
    assert abs(with_up_proj - measured) <= bound
    assert predicted("[core_attn]")[1] - measured > 10 * bound


def test_mla_up_proj_in_the_flops_count():
    """recompute_forward_flops for mla_up_proj is what torch's FLOP counter sees more in a forward +
    backward with it than without (each layer's two up-projections once more)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from torch.utils.flop_counter import FlopCounterMode

    from model.gpt import ModelBuild, build_model_chunks
    from planning.flops import recompute_forward_flops
    from pretrain.recipe import load_recipe

    def counted(overrides: list[str]) -> tuple[float, object]:
        model = load_recipe("tiny_deepseek", ["model.num_layers=2", "model.seq_length=16", *overrides]).model
        (chunk,) = build_model_chunks(model, ModelBuild(), 384)
        tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
        try:
            with FlopCounterMode(display=False) as counter:
                chunk(tokens, torch.arange(16).expand(2, -1), None, labels=tokens).sum().backward()
        finally:
            get_moe_layer_wise_logging_tracker().clear()
        return counter.get_total_flops() / tokens.numel(), model

    plain, _ = counted([])
    rerun, model = counted(["model.recompute_granularity=selective", "model.recompute_modules=[mla_up_proj]"])
    assert rerun - plain == recompute_forward_flops(model) > 0

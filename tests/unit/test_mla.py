"""Multi-latent attention and group-limited routing (model/attention/mla.py, model/routing.py): every
refusal's message, SDPA with unequal query/key and value head widths against the softmax formula, a
tiny DeepSeek-V3-shaped model (MLA, sigmoid group-limited routing, a shared expert) built and run on
CPU, its router against the routing formula, and the upstream fix MLA needs without transformer-engine."""

import math

import pytest
import torch

from model.attention.mla import MlaConfig
from model.config import ModelConfig
from model.moe_config import MoeConfig
from tests.helpers.recipes import error_of, in_tmp  # noqa: F401  (in_tmp: autouse, each test runs in tmp_path)

MLA = ["model.attention=mla", "model.num_query_groups=null"]
GROUPS = ["model.moe.num_experts=8", "model.moe.score_function=sigmoid"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [*MLA, "model.transformer_impl=transformer_engine"],
            "model.attention = mla is built on the local spec only: set model.transformer_impl = local",
        ),
        (
            ["model.attention=mla"],
            "model.num_query_groups does not apply to model.attention = mla: set model.num_query_groups = null "
            "(model.mla sets the head widths)",
        ),
        (
            [*MLA, "model.qk_layernorm=true"],
            "model.qk_layernorm does not apply to model.attention = mla: set model.qk_layernorm = false "
            "(its latents have their norms)",
        ),
        (
            [*MLA, "model.rope_scaling.type=llama3"],
            "model.rope_scaling.type = llama3 is not built for model.attention = mla (MLA applies its own "
            "RoPE: none or yarn)",
        ),
        (
            ["model.rope_scaling.type=yarn"],
            "model.rope_scaling.type = yarn is built for model.attention = mla only (megatron-core's MLA "
            "applies it; the standard attention's RoPE takes llama3)",
        ),
        (
            [*MLA, "model.rope_scaling.type=yarn", "model.rope_scaling.beta_slow=32"],
            "model.rope_scaling.beta_fast = 32.0 must exceed model.rope_scaling.beta_slow = 32.0",
        ),
        (
            [*MLA, "train.precision=bf16", "fp8.enabled=true"],
            "fp8 on the local spec is not built for model.attention = mla (its latent projections)",
        ),
        (
            [*MLA, "model.add_bias_linear=true"],
            "model.add_bias_linear is not built for model.attention = mla: set model.add_bias_linear = false",
        ),
        (
            [*MLA, "model.head_dim=16"],
            "model.head_dim does not apply to model.attention = mla: set model.head_dim = null "
            "(model.mla sets the head widths)",
        ),
        (
            ["model.recompute_granularity=selective", "model.recompute_modules=[mla_up_proj]"],
            "model.recompute_modules: mla_up_proj has nothing to recompute: the model has no multi-latent "
            "attention (model.attention = mla)",
        ),
        (
            ["model.mtp_num_layers=2", "data.reset_attention_mask=true"],
            "data.reset_attention_mask = true is built for model.mtp_num_layers = 1 (got 2): megatron-core "
            "would roll the loss mask of a second MTP module across document ends",
        ),
        (
            ["model.mtp_num_layers=1", "model.transformer_impl=transformer_engine"],
            "model.mtp_num_layers = 1 is built on the local spec only: set model.transformer_impl = local",
        ),
        (
            [
                "model.mtp_num_layers=1",
                "model.recompute_granularity=full",
                "model.recompute_method=block",
                "model.recompute_num_layers=1",
            ],
            "model.mtp_num_layers = 1 with full recompute needs model.recompute_method = uniform and "
            "model.recompute_num_layers = 1",
        ),
        (
            [*GROUPS, "model.moe.num_groups=2"],
            "model.moe.num_groups and model.moe.group_top_k are set together (group-limited routing)",
        ),
        (
            [*GROUPS, "model.moe.num_groups=3", "model.moe.group_top_k=1"],
            "model.moe.num_groups = 3 does not divide model.moe.num_experts = 8",
        ),
        (
            [*GROUPS, "model.moe.num_groups=2", "model.moe.group_top_k=4", "model.moe.top_k=4"],
            "model.moe.group_top_k = 4 exceeds model.moe.num_groups = 2",
        ),
        (
            [*GROUPS, "model.moe.num_groups=4", "model.moe.group_top_k=2", "model.moe.top_k=3"],
            "model.moe.group_top_k = 2 does not divide model.moe.top_k = 3 (megatron-core scores a group by "
            "the sum of its top_k / group_top_k highest expert scores)",
        ),
        (
            [*GROUPS, "model.moe.num_groups=4", "model.moe.group_top_k=1", "model.moe.top_k=4"],
            "model.moe.top_k = 4 exceeds the experts a token can reach: model.moe.group_top_k × experts per "
            "group (model.moe.num_experts / num_groups) = 1 × 2",
        ),
    ],
)
def test_refusals(overrides, message):
    assert error_of("tiny_gpt.yaml", overrides) == message


def test_sdpa_takes_unequal_query_key_and_value_widths(megatron_single_process):
    """MLA hands the core attention q/k heads 24 wide and v heads 12 wide. Without `v_channels`
    the output is viewed at the q/k width and raises (checked by hand: RuntimeError in `view`)."""
    from megatron.core.transformer.enums import AttnMaskType

    from model.attention.sdpa import SDPAttention
    from model.gpt import ModelBuild, transformer_config

    config = transformer_config(_tiny_deepseek(), ModelBuild())
    scale = 0.3
    attention = SDPAttention(
        config, 1, AttnMaskType.causal, "self", softmax_scale=scale, k_channels=24, v_channels=12
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(5, 2, 4, 24, generator=gen) for _ in range(2))  # [s, b, np, hn]
    v = torch.randn(5, 2, 4, 12, generator=gen)
    scores = torch.einsum("sbnh,tbnh->bnst", q, k) * scale
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
    expected = torch.einsum("bnst,tbnh->sbnh", scores.softmax(-1), v).reshape(5, 2, 48)
    torch.testing.assert_close(attention(q, k, v, None), expected, rtol=0, atol=1e-6)


def _tiny_deepseek() -> ModelConfig:
    """The issue's tiny DeepSeek-V3 shapes: MLA q_lora 32, kv_lora 16, nope 16, rope 8, v 16; layer 0
    dense, layer 1 with 8 routed experts (top-2 from 1 of 2 groups, sigmoid, scaled by 2.5) and a shared one."""
    moe = MoeConfig(
        num_experts=8,
        top_k=2,
        ffn_hidden_size=32,
        shared_expert_ffn_hidden_size=32,
        first_dense_layers=1,
        score_function="sigmoid",
        num_groups=2,
        group_top_k=1,
        routed_scaling_factor=2.5,
        load_balancing="none",
    )
    mla = MlaConfig(q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, attention="mla", mla=mla, moe=moe)


def test_tiny_deepseek_builds_runs_and_routes_by_group(megatron_single_process):
    from model.gpt import ModelBuild, build_model_chunks, parameter_counts

    (chunk,) = build_model_chunks(_tiny_deepseek(), ModelBuild(), vocab_size=128)
    attention = chunk.decoder.layers[0].self_attention
    shapes = {n: tuple(p.shape) for n, p in attention.named_parameters()}
    assert shapes == {
        "linear_proj.weight": (64, 4 * 16),
        "linear_q_down_proj.weight": (32, 64),
        "linear_q_up_proj.weight": (4 * 24, 32),
        "linear_kv_down_proj.weight": (16 + 8, 64),
        "linear_kv_up_proj.weight": (4 * 32, 16),
        "q_layernorm.weight": (32,),
        "kv_layernorm.weight": (16,),
    }
    counted = parameter_counts(_tiny_deepseek(), vocab_size=128).total
    assert counted == sum(
        p.numel() for p in chunk.parameters()
    )  # the dry run's count (standard attention's formula: 7,072 more)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = chunk(tokens, torch.arange(12).expand(2, 12), None)
    assert logits.shape == (2, 12, 128) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention.parameters())

    router = chunk.decoder.layers[1].mlp.router
    hidden = torch.randn(6, 1, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs, routing_map = router(hidden)
        expected = _group_limited(hidden.view(6, 64) @ router.weight.T, groups=2, group_top_k=1, top_k=2, scale=2.5)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert torch.equal(routing_map, expected > 0)
    # negative control: these tokens route differently without the groups, so a router ignoring them fails
    assert not torch.equal(expected, _group_limited(hidden.view(6, 64) @ router.weight.T, 1, 1, 2, 2.5))


def _group_limited(logits: torch.Tensor, groups: int, group_top_k: int, top_k: int, scale: float) -> torch.Tensor:
    """DeepSeek-V3's routing: sigmoid scores; a group's score is the sum of its 2 best; experts of the
    best group_top_k groups compete for top_k; weights renormalized over the chosen, times scale."""
    scores = logits.sigmoid()
    tokens, experts = scores.shape
    by_group = scores.view(tokens, groups, experts // groups)
    best_groups = by_group.topk(2, dim=-1).values.sum(-1).topk(group_top_k, dim=-1).indices
    allowed = torch.zeros(tokens, groups, dtype=torch.bool).scatter(1, best_groups, True)
    allowed = allowed.repeat_interleave(experts // groups, dim=1)
    chosen = scores.masked_fill(~allowed, -1.0).topk(top_k, dim=-1).indices
    weights = scores.gather(1, chosen)
    weights = weights / weights.sum(-1, keepdim=True) * scale
    return torch.zeros_like(scores).scatter(1, chosen, weights)


def test_upstream_mla_have_te_is_fixed(megatron_single_process):
    """multi_latent_attention.py:184 calls isinstance(..., TELinear) where TELinear is megatron-core's
    MagicMock stand-in without transformer-engine: every MLA layer fails to build."""
    from megatron.core.transformer import multi_latent_attention as mla

    from model.gpt import ModelBuild, build_model_chunks
    from upstream import fixes

    fix = fixes.FIXES.get("multi_latent_attention.HAVE_TE")
    fix.revert()
    try:
        assert mla.HAVE_TE
        with pytest.raises(TypeError, match="isinstance"):
            build_model_chunks(_tiny_deepseek(), ModelBuild(perform_initialization=False), vocab_size=128)
    finally:
        assert "multi_latent_attention.HAVE_TE" in fixes.apply_all()
    build_model_chunks(_tiny_deepseek(), ModelBuild(perform_initialization=False), vocab_size=128)


def test_published_deepseek_v3_counts_transformers_parameters():
    """transformers' DeepseekV3ForCausalLM with its default (the published) config, built on the
    meta device, has 671,026,404,352 parameters (no MTP module); the recipe's count without its MTP
    module must be that. The MTP module's own: 3 norms (3 × 7168), eh_proj (2 × 7168²) and one MoE
    layer (11,507,286,016), 11.61B; with the copies of the embedding and head its checkpoint stores
    (2 × 129280 × 7168) that makes the 685B DeepSeek publishes (684.49B)."""
    from model.gpt import parameter_counts
    from pretrain.recipe import load_recipe

    model = load_recipe("deepseek_v3").model
    assert model.vocab_size is not None
    counts = parameter_counts(model, model.vocab_size)
    assert counts.total - counts.mtp == 671_026_404_352
    assert counts.mtp == 3 * 7168 + 2 * 7168**2 + 11_507_286_016 == 11_610_067_968

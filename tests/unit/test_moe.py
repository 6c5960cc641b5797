"""Mixture of experts in one process: balancing losses and capacity dropping against hand
computations, expert-bias balancing, parameter counts, recipe validation."""

import dataclasses
import math
import re

import pytest
import torch

from common.errors import RecipeError
from model.gpt import ModelBuild, build_model_chunks, meta_device, padded_vocab_size, parameter_counts
from model.moe_config import moe_layer_pattern
from pretrain.recipe import load_recipe

# ------------------------------------------------------------------------------ router unit tests


def _router(**config_fields):
    """megatron-core's TopKRouter (4 experts, hidden 3, layer 1) in training mode, fixed weights."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=1,
        hidden_size=3,
        num_attention_heads=1,
        num_moe_experts=4,
        moe_router_topk=2,
        add_bias_linear=False,
        use_cpu_initialization=True,
        calculate_per_token_loss=True,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.1,
    )
    fields.update(config_fields)
    router = TopKRouter(TransformerConfig(**fields), pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.5, -0.5], [-1.0, 0.2, 0.3], [0.4, -0.7, 0.9], [0.0, 1.0, -1.0]]))
    return router.train()


def _tokens(seed: int, tokens: int = 6):
    return torch.randn(tokens, 1, 3, generator=torch.Generator().manual_seed(seed))  # [s, b, h]


def _hand_aux_and_z(x: torch.Tensor, weight: torch.Tensor, top_k: int):
    """Switch/GShard load-balancing loss E · Σ_i f_i · P_i and the ST-MoE z-loss, by hand.

    f_i = share of the T·k routing slots that chose expert i; P_i = mean router probability of
    expert i (softmax over all experts); z = mean over tokens of logsumexp(logits)².
    """
    rows = x.reshape(-1, x.shape[-1]).tolist()
    experts = weight.shape[0]
    logits = [[sum(a * b for a, b in zip(row, w)) for w in weight.tolist()] for row in rows]
    chosen = [0] * experts
    prob_sum = [0.0] * experts
    z = 0.0
    for token_logits in logits:
        peak = max(token_logits)
        exps = [math.exp(v - peak) for v in token_logits]
        total = sum(exps)
        for i, e in enumerate(exps):
            prob_sum[i] += e / total
        for i in sorted(range(experts), key=lambda i: -token_logits[i])[:top_k]:
            chosen[i] += 1
        z += (peak + math.log(total)) ** 2
    tokens = len(rows)
    aux = experts * sum((chosen[i] / (tokens * top_k)) * (prob_sum[i] / tokens) for i in range(experts))
    return aux, z / tokens


def _tiny_moe_model(**moe_fields):
    model = load_recipe("tiny_moe").model
    return dataclasses.replace(model, moe=dataclasses.replace(model.moe, **moe_fields))


def test_aux_and_z_loss_equal_hand_computation(megatron_single_process):
    """Two micro-batches through megatron-core's router; metrics report the mean of the two."""
    from model.moe import MoeMonitor

    router = _router(moe_z_loss_coeff=0.01)
    model = dataclasses.replace(_tiny_moe_model(num_experts=4, z_loss_coeff=0.01), num_layers=1)
    monitor = MoeMonitor(model, [torch.nn.ModuleList([router])])
    expected = [_hand_aux_and_z(_tokens(seed), router.weight.detach(), top_k=2) for seed in (1, 2)]
    for seed in (1, 2):
        router(_tokens(seed))
    metrics = monitor.step_metrics(torch.device("cpu"), micro_batches=2, data_parallel=1, ranks_per_stage=1)
    assert metrics["moe_aux_loss"] == pytest.approx(sum(a for a, _ in expected) / 2, rel=1e-6)
    assert metrics["moe_z_loss"] == pytest.approx(sum(z for _, z in expected) / 2, rel=1e-6)
    # The two micro-batches route differently, so a mean that took only one would fail.
    assert abs(expected[0][0] - expected[1][0]) > 1e-3


def test_capacity_dropping_matches_hand_count(megatron_single_process):
    """capacity = ceil(T·k / E · factor) slots per expert; choices beyond it are dropped."""
    from model.moe import RoutingStats, load_metrics

    router = _router(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs")
    stats = RoutingStats(num_layers=1, num_experts=4, top_k=2, pad_to_capacity=False)
    stats.attach([router])
    x = _tokens(seed=3, tokens=10)
    logits = x.view(-1, 3) @ router.weight.detach().T
    chosen = torch.zeros(4, dtype=torch.long)
    for row in logits:
        for i in torch.topk(row, 2).indices.tolist():
            chosen[i] += 1
    capacity = math.ceil(10 * 2 / 4 * 1.0)
    hand_kept = [min(int(c), capacity) for c in chosen]
    hand_dropped = sum(max(int(c) - capacity, 0) for c in chosen)
    assert hand_dropped > 0, "the fixed routing must overflow some expert"
    router(x)
    counts = stats.reduce_and_reset(torch.device("cpu"))
    assert counts["load"][0].tolist() == hand_kept
    metrics = load_metrics(counts["load"], counts["routed"], moe_layers=[0])
    assert metrics["moe_dropped_fraction"] == pytest.approx(hand_dropped / 20)
    assert metrics["moe_expert_load"]["1"] == [round(k / sum(hand_kept), 6) for k in hand_kept]


def test_load_imbalance_metrics():
    from model.moe import load_metrics

    load = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    metrics = load_metrics(load, torch.tensor([40.0, 40.0], dtype=torch.float64), moe_layers=[0, 1])
    assert metrics["moe_load_max_over_mean"] == 4.0  # worst layer: all on one expert
    assert metrics["moe_load_cv"] == pytest.approx(math.sqrt(3))  # std 17.32 / mean 10
    assert metrics["moe_load_cv_mean"] == pytest.approx(math.sqrt(3) / 2)
    assert metrics["moe_load_cv_by_layer"] == {"1": 0.0, "2": pytest.approx(math.sqrt(3))}
    assert metrics["moe_dropped_fraction"] == 0.0


def test_wandb_gets_one_scalar_per_layer_and_expert():
    from pretrain.metrics import wandb_scalars

    record = {"step": 3, "loss": 2.5, "moe_expert_load": {"1": [0.75, 0.25]}, "moe_load_cv_by_layer": {"1": 0.5}}
    assert wandb_scalars(record) == {
        "loss": 2.5,
        "moe_expert_load/layer_1/expert_0": 0.75,
        "moe_expert_load/layer_1/expert_1": 0.25,
        "moe_load_cv_by_layer/layer_1": 0.5,
    }


def test_expert_bias_lowers_load_imbalance_over_steps(megatron_single_process):
    """DeepSeek-V3 balancing on a skewed input: each step the bias moves by ±rate towards equal
    load (megatron-core's update, as finalize_model_grads applies it), and the spread shrinks."""
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    from model.moe import RoutingStats, load_metrics

    router = _router(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_bias_update_rate=0.05,
    )
    stats = RoutingStats(num_layers=1, num_experts=4, top_k=2, pad_to_capacity=False)
    stats.attach([router])
    skewed = _tokens(seed=4, tokens=256) + torch.tensor([1.5, 0.0, 0.0])  # favours expert 0 (and 2)
    cvs, ranges = [], []
    for _ in range(30):
        router(skewed)
        counts = stats.reduce_and_reset(torch.device("cpu"))
        cvs.append(load_metrics(counts["load"], counts["routed"], moe_layers=[0])["moe_load_cv"])
        with torch.no_grad():
            router.expert_bias.copy_(get_updated_expert_bias(router.local_tokens_per_expert, router.expert_bias, 0.05))
            router.local_tokens_per_expert.zero_()
        ranges.append(float(router.expert_bias.max() - router.expert_bias.min()))
    assert cvs[0] > 0.5, f"the input must start skewed, cv {cvs[0]:.3f}"
    assert max(cvs[-5:]) < 0.25 * cvs[0], f"cv {cvs[0]:.3f} -> {cvs[-5:]}"
    assert ranges[-1] > 0.2  # the bias did the balancing (no aux loss here)


def test_expert_biases_train_where_upstream_raises(megatron_single_process):
    """transformer/mlp.py:247 adds the expert bias in place on a custom-Function view; our expert
    output projection (model/moe.py:ExpertRowParallelLinear) returns a copy in that case."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from model.gpt import _local_layer_spec, transformer_config

    model = dataclasses.replace(_tiny_moe_model(), add_bias_linear=True)
    config = transformer_config(model, ModelBuild())
    x = _tokens(seed=5, tokens=8).expand(8, 2, 3).repeat(1, 1, 22)[..., :64].contiguous()

    def forward_backward(submodules):
        layer = MoELayer(config, submodules)
        layer.set_layer_number(1)
        out, _ = layer(x.clone().requires_grad_(True))
        out.sum().backward()

    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        forward_backward(get_gpt_layer_local_spec(num_experts=8).submodules.mlp.submodules)
    forward_backward(_local_layer_spec(config, 0, num_experts=8).submodules.mlp.submodules)


def test_upstream_te_general_gemm_name_error_is_fixed(megatron_single_process):
    """moe_utils.py:1192 reads `te_general_gemm`, bound only when transformer-engine imports."""
    from megatron.core.transformer.moe import moe_utils

    from upstream import fixes

    fix = fixes.FIXES.get("moe_utils.te_general_gemm")
    fix.revert()
    saved = moe_utils.__dict__.pop("te_general_gemm", None)  # transformer-engine's, where it is installed
    try:
        with pytest.raises(NameError, match="te_general_gemm"):
            moe_utils.router_gating_linear(torch.ones(2, 3), torch.ones(4, 3), None, torch.float32)
        assert "moe_utils.te_general_gemm" in fixes.apply_all()
        out = moe_utils.router_gating_linear(torch.ones(2, 3), torch.ones(4, 3), None, torch.float32)
        assert out.tolist() == [[3.0] * 4] * 2
    finally:
        if saved is not None:
            fix.revert()
            moe_utils.te_general_gemm = saved


# ------------------------------------------------------------------------- parameters and recipes


@pytest.mark.parametrize(
    "moe_fields, biases",
    [
        ({}, False),
        ({"shared_expert_ffn_hidden_size": 96}, False),
        ({"first_dense_layers": 1, "layer_freq": 2}, False),
        ({"first_dense_layers": 1}, True),
        ({"num_experts": None}, True),
    ],
    ids=["tiny_moe", "shared", "dense-first-every-2nd", "biases", "dense-biases"],
)
def test_formula_equals_built_model(moe_fields, biases, megatron_single_process):
    model = dataclasses.replace(_tiny_moe_model(**moe_fields), add_bias_linear=biases)
    vocab = padded_vocab_size(model, 257, tensor=1)
    with meta_device():
        (chunk,) = build_model_chunks(model, ModelBuild(perform_initialization=False), vocab)
    assert parameter_counts(model, vocab).total == sum(p.numel() for p in chunk.parameters())


def test_active_parameters_count_top_k_experts():
    model = _tiny_moe_model(shared_expert_ffn_hidden_size=96)
    counts = parameter_counts(model, 384)
    # 8 experts of 3·64·64, 2 active, in each of 4 layers.
    assert counts.total - counts.active == 4 * (8 - 2) * 3 * 64 * 64


def test_layer_pattern():
    assert moe_layer_pattern(_tiny_moe_model()) == [True] * 4
    assert moe_layer_pattern(_tiny_moe_model(first_dense_layers=1, layer_freq=2)) == [False, True, False, True]
    assert moe_layer_pattern(load_recipe("tiny_gpt").model) == [False] * 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.expert=3"], "parallel.expert = 3 does not divide model.moe.num_experts = 8"),
        (["model.moe.top_k=9"], "model.moe.top_k = 9 exceeds model.moe.num_experts = 8"),
        (
            ["model.moe.expert_bias=true"],
            "model.moe.expert_bias = true needs model.moe.score_function = sigmoid, got softmax",
        ),
        (["model.moe.pad_to_capacity=true"], "model.moe.pad_to_capacity = true needs model.moe.capacity_factor"),
        (
            ["model.moe.bias_update_rate=0.01"],
            "model.moe.bias_update_rate = 0.01 is only read with model.moe.expert_bias = true",
        ),
        (
            ["model.moe.drop_policy=position"],
            "model.moe.drop_policy = position is only read with model.moe.capacity_factor (without it no token "
            "is dropped)",
        ),
        (
            ["parallel.tensor=2"],
            "model.moe with parallel.tensor = 2 needs parallel.sequence_parallel = true "
            "(megatron-core's MoE layer refuses tensor parallelism without it)",
        ),
        (
            ["model.moe.first_dense_layers=4"],
            "model.moe.first_dense_layers = 4 leaves no MoE layer in model.num_layers = 4",
        ),
        (
            ["model.moe.top_k=1"],
            "model.moe.top_k = 1 with softmax scores needs model.moe.pre_softmax = true "
            "(a softmax over one expert is constant: the router would get no gradient)",
        ),
        (["model.moe.dispatcher=flex"], "model.moe.dispatcher must be one of alltoall | allgather, got 'flex'"),
        (["model.moe.capacity_factor=0"], "model.moe.capacity_factor must be positive, got 0.0"),
        (["parallel.expert_tensor=3"], "parallel.expert_tensor = 3 does not divide model.moe.ffn_hidden_size = 64"),
        (
            ["model.add_bias_linear=true", "model.moe.shared_expert_ffn_hidden_size=64"],
            "model.add_bias_linear = true cannot be combined with model.moe.shared_expert_ffn_hidden_size "
            "(megatron-core's shared experts have no biases)",
        ),
        (
            ["model.add_bias_linear=true", "parallel.expert_tensor=2"],
            "model.add_bias_linear = true with experts needs parallel.expert_tensor = 1, got 2 "
            "(megatron-core supports expert biases only without expert tensor parallelism)",
        ),
    ],
)
def test_moe_recipe_errors(overrides, message):
    with pytest.raises(RecipeError, match="^" + re.escape(message) + "$"):
        load_recipe("tiny_moe", overrides)


def test_expert_parallel_needs_experts():
    with pytest.raises(RecipeError, match=re.escape("parallel.expert = 2 needs experts: set model.moe.num_experts")):
        load_recipe("tiny_gpt", ["parallel.expert=2"])

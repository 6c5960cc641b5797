"""pretrain/muon.py's step against torch.optim.Muon + torch.optim.AdamW, in process on the same
tensors (no framework between them): every matrix, both Newton-Schulz precisions, Nesterov or not,
both learning-rate adjustments; and the recipe keys' checks."""

import pytest
import torch

from common.errors import RecipeError
from pretrain.muon import Matrix, MuonAdamW, MuonSettings
from pretrain.optim import OptimizerConfig

STEPS = 8
LR, WD, BETAS, EPS = 3e-3, 0.1, (0.9, 0.95), 1e-8
COEFFICIENTS = (3.4445, -4.775, 2.0315)


def _tensors(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three matrices (wide, tall, square) and a vector, plus their gradients for every step."""
    torch.manual_seed(seed)
    params = [torch.randn(24, 40), torch.randn(48, 16), torch.randn(32, 32), torch.randn(40)]
    grads = [torch.randn(STEPS, *p.shape) for p in params]
    return params, grads


def _ours(settings: MuonSettings, params, grads) -> list[torch.Tensor]:
    params = [p.clone().requires_grad_() for p in params]
    matrices = [Matrix(f"m{i}", p, p, None, None) for i, p in enumerate(params[:3])]
    groups = [{"params": params[:3], "weight_decay": WD}, {"params": params[3:], "weight_decay": 0.0}]
    adamw = {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD}
    seed = torch.optim.AdamW(groups, **adamw)  # the groups as megatron-core hands them over
    optimizer = MuonAdamW(seed.param_groups, adamw, settings, matrices)
    for step in range(STEPS):
        for p, g in zip(params, grads):
            p.grad = g[step].clone()
        optimizer.step()
    return [p.detach() for p in params]


def _torch(settings: MuonSettings, params, grads) -> list[torch.Tensor]:
    params = [p.clone().requires_grad_() for p in params]
    muon = torch.optim.Muon(
        params[:3],
        lr=LR,
        weight_decay=WD,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        ns_coefficients=settings.ns_coefficients,
        eps=settings.eps,
        ns_steps=settings.ns_steps,
        adjust_lr_fn=settings.adjust_lr,
    )
    adamw = torch.optim.AdamW(params[3:], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    for step in range(STEPS):
        for p, g in zip(params, grads):
            p.grad = g[step].clone()
        muon.step()
        adamw.step()
    return [p.detach() for p in params]


def _settings(**changes) -> MuonSettings:
    base = dict(
        momentum=0.95,
        nesterov=True,
        ns_steps=5,
        ns_coefficients=COEFFICIENTS,
        eps=1e-7,
        ns_dtype=torch.bfloat16,
        adjust_lr="match_rms_adamw",
        split_qkv=True,
    )
    return MuonSettings(**{**base, **changes})


@pytest.mark.parametrize(
    "changes", [{}, {"nesterov": False}, {"adjust_lr": "original", "momentum": 0.9}, {"ns_steps": 3}]
)
def test_step_is_torch_muon_and_adamw(changes):
    """bf16 Newton-Schulz (torch's only precision): the same tensors to the last bit's rounding."""
    params, grads = _tensors(0)
    ours, theirs = _ours(_settings(**changes), params, grads), _torch(_settings(**changes), params, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_negative_controls_fail():
    """No Newton-Schulz step (the update only normalized), or fp32 against torch's bf16: not torch's."""
    params, grads = _tensors(0)
    theirs = _torch(_settings(), params, grads)
    for changes in ({"ns_steps": 0}, {"ns_dtype": torch.float32}):
        ours = _ours(_settings(**changes), params, grads)
        assert not torch.allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6), changes


def test_muon_keys_need_muon():
    with pytest.raises(RecipeError, match="optimizer.ns_steps is a Muon key: set optimizer.name = muon"):
        OptimizerConfig(ns_steps=3).check()
    OptimizerConfig(name="muon", ns_steps=3).check()
    with pytest.raises(RecipeError, match="optimizer.qk_clip: MuonClip is not supported"):
        OptimizerConfig(name="muon", qk_clip=100.0).check()


def test_flat_distributed_optimizer_checkpoints_are_refused():
    from pretrain.recipe import load_recipe

    overrides = ["optimizer.name=muon", "parallel.distributed_optimizer=true"]
    with pytest.raises(RecipeError, match="dp_reshardable holds Adam's moments only, not Muon's momentum"):
        load_recipe("tiny_gpt", [*overrides, "checkpoint.optimizer_format=dp_reshardable"])
    load_recipe("tiny_gpt", overrides)


def test_grouped_experts_are_stepped_by_muon_expert_by_expert(megatron_single_process):
    """Grouped experts' stacked [experts, out, in] weights once went to AdamW silently (only the
    start-up line said so); now Muon steps each expert's slice (tests/e2e/test_muon_layouts.py holds
    the curve to the sequential experts'). transformer-engine's grouped experts stay refused."""
    from model.gpt import ModelBuild, build_model_chunks
    from pretrain.muon import describe
    from pretrain.recipe import load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(
            "tiny_moe",
            ["optimizer.name=muon", "model.moe.grouped_gemm=true", "model.transformer_impl=transformer_engine"],
        )
    assert str(err.value) == (
        "optimizer.name = muon with model.moe.grouped_gemm = true is not built for model.transformer_impl = "
        "transformer_engine (its per-expert fc1 weights are not split [gate; up]); set model.transformer_impl = "
        "local or model.moe.grouped_gemm = false"
    )
    for grouped, fc1, fc2 in (
        (True, ".mlp.experts.weight1 (each expert apart; gate, up apart)", ".mlp.experts.weight2 (each expert apart)"),
        (
            False,
            ".mlp.experts.local_experts.*.linear_fc1.weight (gate, up apart)",
            ".local_experts.*.linear_fc2.weight",
        ),
    ):
        model = load_recipe("tiny_moe", ["optimizer.name=muon", f"model.moe.grouped_gemm={str(grouped).lower()}"]).model
        muon, adamw = describe(build_model_chunks(model, ModelBuild(), 257), True).split("; AdamW for ")
        assert fc1 in muon and fc2 in muon and "expert" not in adamw, (grouped, muon, adamw)

"""model/fp8/linear.py on one process: the three GEMMs of an FP8 linear against a hand-written dequantize-
then-matmul reference (and not the bf16 result), the spec's choice of FP8 linears, the
transformer-engine field mapping, the run-time refusals and the log lines."""

import dataclasses

import pytest
import torch

from common.errors import UserError
from model.config import Fp8Config, ModelConfig
from model.fp8.linear import (
    Fp8ColumnParallelLinear,
    Fp8RowParallelLinear,
    check_runtime,
    describe,
    gemms_for,
    linear_places,
    summarize,
    transformer_config_fields,
)
from model.gpt import ModelBuild, build_model_chunks, transformer_config
from model.moe_config import MoeConfig
from model.precision import Precision
from planning.gpus import device_peak_tflops
from pretrain.metrics import Metrics, _progress_line

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
BF16_ULP = 2**-7  # relative spacing of bf16 numbers at its coarsest: one rounding step


def fake_quantized(x: torch.Tensor, dtype: torch.dtype, dim: int | None) -> torch.Tensor:
    """What an FP8 cast with current scaling keeps of x, back in fp32: scale = fp8 max / amax (one
    amax, or one per row/column along `dim`), saturate, round to `dtype`, divide the scale out."""
    fmax = torch.finfo(dtype).max
    x = x.float()
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (fmax / amax.double().clamp(min=1e-12)).float()
    return (x * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _config():
    return transformer_config(ModelConfig(), ModelBuild(precision=Precision("bf16")))


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_linear_gemms_are_fp8_matmuls_of_dequantized_operands(recipe, fmt, megatron_single_process):
    """Output, input gradient and weight gradient of an FP8 column-parallel linear each equal the
    fp32 matmul of the dequantized FP8 operands (up to the bf16 rounding of the result), and are
    far from the bf16 matmul and from the other gradient format."""
    gemms = gemms_for(Fp8Config(enabled=True, recipe=recipe, format=fmt))
    linear = Fp8ColumnParallelLinear(
        96, 80, config=_config(), init_method=torch.nn.init.xavier_normal_, bias=False, fp8=gemms
    )
    linear = linear.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 96, generator=g).to(torch.bfloat16).requires_grad_()
    dy = (torch.randn(16, 4, 80, generator=g) * 1e-3).to(torch.bfloat16)
    y, _ = linear(x)
    gx, gw = torch.autograd.grad(y, (x, linear.weight), dy)

    rows, cols = (-1, 0) if recipe == "rowwise" else (None, None)  # per token / output channel; per column
    grad_dtype, other = (E5M2, E4M3) if fmt == "hybrid" else (E4M3, E5M2)
    x2, dy2, w = x.detach().reshape(-1, 96), dy.reshape(-1, 80), linear.weight.detach()
    expected = {
        "output": fake_quantized(x2, E4M3, rows) @ fake_quantized(w, E4M3, rows).t(),
        "grad_input": fake_quantized(dy2, grad_dtype, rows) @ fake_quantized(w, E4M3, cols),
        "grad_weight": fake_quantized(dy2, grad_dtype, cols).t() @ fake_quantized(x2, E4M3, cols),
    }
    got = {"output": y.reshape(-1, 80), "grad_input": gx.reshape(-1, 96), "grad_weight": gw}
    bf16 = {"output": x2 @ w.t(), "grad_input": dy2 @ w, "grad_weight": dy2.t() @ x2}
    other_format = {
        "grad_input": fake_quantized(dy2, other, rows) @ fake_quantized(w, E4M3, cols),
        "grad_weight": fake_quantized(dy2, other, cols).t() @ fake_quantized(x2, E4M3, cols),
    }
    for name, value in got.items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value, expected[name].to(torch.bfloat16), rtol=BF16_ULP, atol=0, msg=name)
        assert rel(bf16[name], expected[name]) > 2e-2, name  # measured 3.5e-2 to 5.9e-2
        if name in other_format:
            assert rel(other_format[name], expected[name]) > 2e-2, name  # measured ≥ 6e-2


def test_bias_and_row_parallel_linear(megatron_single_process):
    """A row-parallel FP8 linear (bias added outside its GEMM by megatron-core) and a column-parallel
    one with a bias: output = FP8 matmul + bias; bias gradient = sum of output gradients in bf16."""
    gemms = gemms_for(Fp8Config(enabled=True))
    init = torch.nn.init.xavier_normal_
    for cls in (Fp8ColumnParallelLinear, Fp8RowParallelLinear):
        kwargs = {"gather_output": False} if cls is Fp8ColumnParallelLinear else {"input_is_parallel": True}
        linear = cls(64, 48, config=_config(), init_method=init, bias=True, skip_bias_add=False, fp8=gemms, **kwargs)
        linear = linear.to(torch.bfloat16)
        with torch.no_grad():
            linear.bias.normal_()
        x = torch.randn(8, 2, 64).to(torch.bfloat16)
        y, _ = linear(x)
        w = linear.weight.detach()
        expected = fake_quantized(x.reshape(-1, 64), E4M3, None) @ fake_quantized(w, E4M3, None).t()
        expected = expected.to(torch.bfloat16) + linear.bias.detach()
        torch.testing.assert_close(y.reshape(-1, 48), expected, rtol=BF16_ULP, atol=1e-2)
        dy = torch.randn_like(y)
        (grad_bias,) = torch.autograd.grad(y, (linear.bias,), dy)
        torch.testing.assert_close(grad_bias, dy.reshape(-1, 48).sum(0), rtol=BF16_ULP, atol=0)


def _places(model: ModelConfig, fp8: Fp8Config):
    chunks = build_model_chunks(model, ModelBuild(precision=Precision("bf16"), fp8=fp8), vocab_size=256)
    return linear_places(chunks)


def test_every_decoder_linear_runs_in_fp8_and_first_last_layers_stay_bf16(megatron_single_process):
    model = dataclasses.replace(ModelConfig(), num_layers=4)
    places = ["mlp.linear_fc1", "mlp.linear_fc2", "self_attention.linear_proj", "self_attention.linear_qkv"]
    fp8, bf16 = _places(model, Fp8Config(enabled=True))
    assert fp8 == {(layer, p) for layer in range(1, 5) for p in places}
    assert bf16 == {(0, "output_layer")}
    fp8, bf16 = _places(model, Fp8Config(enabled=True, first_last_layers_bf16=1))
    assert fp8 == {(layer, p) for layer in (2, 3) for p in places}
    assert bf16 == {(0, "output_layer")} | {(layer, p) for layer in (1, 4) for p in places}
    assert summarize(fp8, bf16) == (
        "fp8 GEMMs in 8 linears: layers 2-3: " + ", ".join(places) + "; "
        "bf16 GEMMs: output_layer; layers 1, 4: " + ", ".join(places)
    )
    # negative control: fp8 off builds megatron-core's own linears everywhere
    fp8, bf16 = _places(model, Fp8Config(enabled=False))
    assert fp8 == set() and len(bf16) == 17


def test_routed_and_shared_experts_run_in_fp8_router_does_not(megatron_single_process):
    moe = MoeConfig(num_experts=4, top_k=2, ffn_hidden_size=32, shared_expert_ffn_hidden_size=32)
    model = dataclasses.replace(ModelConfig(), num_layers=2, moe=moe)
    fp8, bf16 = _places(model, Fp8Config(enabled=True))
    places = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.experts.linear_fc1"]
    places += ["mlp.experts.linear_fc2", "mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
    assert fp8 == {(layer, p) for layer in (1, 2) for p in places}
    assert bf16 == {(0, "output_layer")}  # the router is a plain fp32 matmul, not one of these linears


def test_transformer_engine_fields():
    te = dataclasses.replace(ModelConfig(), transformer_impl="transformer_engine")
    fp8 = Fp8Config(enabled=True, recipe="delayed", amax_history_len=16, amax_compute_algo="max", margin=1)
    assert transformer_config_fields(fp8, te) == dict(
        fp8="hybrid",
        fp8_recipe="delayed",
        fp8_param=False,
        fp8_margin=1,
        fp8_amax_history_len=16,
        fp8_amax_compute_algo="max",
    )
    fields = transformer_config_fields(
        Fp8Config(enabled=True, format="e4m3", first_last_layers_bf16=2, params=True), te
    )
    assert fields == dict(
        fp8="e4m3",
        fp8_recipe="tensorwise",
        fp8_param=True,
        fp8_margin=0,
        fp8_amax_history_len=1,
        fp8_amax_compute_algo="most_recent",
        first_last_layers_bf16=True,
        num_layers_at_start_in_bf16=2,
        num_layers_at_end_in_bf16=2,
    )
    config = transformer_config(te, ModelBuild(precision=Precision("bf16"), fp8=fp8))  # megatron-core accepts them
    assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len, config.fp8_margin) == (
        "hybrid",
        "delayed",
        16,
        1,
    )
    # the local spec leaves megatron-core's fp8 unset: our linears do the work there
    assert transformer_config(ModelConfig(), ModelBuild(precision=Precision("bf16"), fp8=fp8)).fp8 is None
    assert transformer_config_fields(Fp8Config(enabled=False), te) == {}


def test_runtime_refuses_transformer_engine_path_without_transformer_engine():
    te = dataclasses.replace(ModelConfig(), transformer_impl="transformer_engine")
    with pytest.raises(UserError) as info:
        check_runtime(Fp8Config(enabled=True, recipe="mxfp8"), te, torch.device("cpu"))
    assert str(info.value) == (
        "fp8.recipe = mxfp8 with model.transformer_impl = transformer_engine needs transformer-engine >= 2.1, "
        "which is not installed: pip install '.[gpu]' on a CUDA machine, or set model.transformer_impl=local "
        "(FP8 GEMMs through torch._scaled_mm)"
    )


def test_runtime_refuses_a_device_without_fp8_gemms(monkeypatch):
    local = ModelConfig()
    check_runtime(Fp8Config(enabled=True, recipe="rowwise"), local, torch.device("cpu"))  # this CPU runs them

    def no_fp8(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9")

    monkeypatch.setattr(torch, "_scaled_mm", no_fp8)
    with pytest.raises(UserError) as info:
        check_runtime(Fp8Config(enabled=True), local, torch.device("cpu"))
    assert str(info.value) == (
        "fp8.recipe = tensorwise, fp8.format = hybrid on the local spec: torch._scaled_mm cannot run on cpu "
        "(torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0 or 8.9); "
        "FP8 GEMMs need a CPU or a GPU of compute capability >= 8.9"
    )


def test_first_log_line_says_fp8():
    model = dataclasses.replace(ModelConfig(), num_layers=6)
    assert describe(Fp8Config(enabled=True, first_last_layers_bf16=1), model) == (
        "fp8: bf16 training with FP8 GEMMs in decoder layers 2-5 (local spec, torch._scaled_mm, tensorwise "
        "current scaling; hybrid: e4m3 forward, e5m2 gradients)"
    )
    te = dataclasses.replace(model, transformer_impl="transformer_engine")
    assert describe(Fp8Config(enabled=True, recipe="mxfp8", format="e4m3", params=True), te) == (
        "fp8: bf16 training with FP8 GEMMs in decoder layers 1-6 (transformer-engine, mxfp8 recipe; "
        "e4m3: e4m3 forward and gradients; FP8 primary weights)"
    )


def test_mfu_against_bf16_peak_and_fp8_peak():
    assert device_peak_tflops("NVIDIA H200", fp8=True) == 1979.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", fp8=True) is None  # no FP8 tensor cores
    metrics = Metrics(None, None, 1000, 10, 1e12, 989.0, 1, 1, 0.0, fp8_peak_tflops=1979.0)
    result = type("R", (), dict(loss=1.0, lr=1e-3, grad_norm=1.0, updated=True, moe={}))()
    record = metrics.record(1, 100, 0, result, step_time=1.0)  # 1000 tokens/s x 1e12 FLOPs = 1000 TFLOP/s
    assert record["mfu"] == pytest.approx(1000 / 989) and record["mfu_fp8"] == pytest.approx(1000 / 1979)
    assert "mfu 101.1% of bf16 peak, 50.5% of fp8 peak" in _progress_line(record)

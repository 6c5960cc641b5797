"""Metrics: FLOPs per token against torch's own FLOP counter, tflops and MFU in the record, and wandb
falling back from online to offline without an API key."""

import dataclasses
import types

import pytest
import torch

from model.config import ModelConfig
from planning.gpus import device_peak_tflops
from pretrain.metrics import LoggingConfig, Metrics, WandbConfig, _init_wandb, flops_per_token


def _tiny(**changes) -> ModelConfig:
    return dataclasses.replace(
        ModelConfig(
            num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2, seq_length=32
        ),
        **changes,
    )


@pytest.mark.parametrize("untie", [True, False], ids=["untied", "tied"])
def test_flops_per_token_counts_what_torch_counts(megatron_single_process, untie):
    """torch's FlopCounterMode over one forward + backward of the built model counts its matmuls
    (and not the CPU's SDPA kernel, which it has no formula for): exactly the matmul part of ours.
    The attention part is Megatron-LM's causal accounting, 6 · layers · seq · hidden per token."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.gpt import ModelBuild, build_model_chunks

    model, vocab, batch = _tiny(untie_embeddings=untie), 128, 2
    (chunk,) = build_model_chunks(model, ModelBuild(), vocab)
    tokens = torch.randint(0, vocab, (batch, model.seq_length))
    positions = torch.arange(model.seq_length).expand(batch, -1)
    with FlopCounterMode(display=False) as counter:
        chunk(tokens, positions, None, labels=tokens).sum().backward()
    counted = counter.get_total_flops() / (batch * model.seq_length)
    attention = 6 * model.num_layers * model.seq_length * model.hidden_size
    assert counted == flops_per_token(model, vocab) - attention


def test_tflops_and_mfu_in_the_record():
    result = types.SimpleNamespace(loss=2.0, lr=1e-3, grad_norm=1.0, updated=True, moe={}, nonfinite=False, stop=False)
    peak = device_peak_tflops("NVIDIA H100 80GB HBM3")
    assert peak == 989.0 and device_peak_tflops("NVIDIA GeForce RTX 2080") is None and device_peak_tflops(None) is None
    # the planner's table (planning/gpus.py), longest name first: a GB200 is not taken for a B200
    assert device_peak_tflops("NVIDIA GB200") == 2500.0 and device_peak_tflops("NVIDIA B200") == 2250.0
    assert device_peak_tflops("NVIDIA L40S", fp8=True) == 733.0 and device_peak_tflops("NVIDIA A10G", fp8=True) is None
    metrics = Metrics(
        LoggingConfig(),
        None,
        tokens_per_step=4096,
        seq_length=128,
        flops_per_token=6e9,
        peak_tflops=peak,
        world_size=8,
        micro_batches=4,
        pipeline_bubble=0.0,
    )
    record = metrics.record(step=3, consumed_samples=96, nonfinite_steps=0, result=result, step_time=0.5)
    # 4096 tokens / 0.5 s × 6e9 FLOPs / 8 devices = 6.144 TFLOP/s per device
    assert record["tokens_per_s"] == 8192.0 and record["tflops_per_device"] == pytest.approx(6.144)
    assert record["mfu"] == pytest.approx(6.144 / 989.0)
    no_peak = Metrics(LoggingConfig(), None, 4096, 128, 6e9, None, 8, 4, 0.0)
    assert "mfu" not in no_peak.record(3, 96, 0, result, 0.5)  # a CPU (or unknown GPU) reports none


@pytest.mark.parametrize(
    "key, netrc, mode",
    [(None, "", "offline"), ("k", "", "online"), (None, "machine api.wandb.ai password k", "online")],
)
def test_wandb_online_without_a_key_logs_offline(key, netrc, mode, tmp_path, monkeypatch, capsys):
    import wandb

    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    (tmp_path / "netrc").write_text(netrc)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    _init_wandb(LoggingConfig(wandb=WandbConfig(mode="online")), tmp_path, {})
    assert seen["mode"] == mode
    warned = "wandb: no API key found, logging offline (wandb sync later)" in capsys.readouterr().err
    assert warned == (mode == "offline")

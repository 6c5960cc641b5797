"""benchmarks/bench_memory.py as users run it: the measured peak of a training step is pinned for two
small configurations, and the memory model's prediction stays within the issue's 10 % of it.

The measured figures are the CPU allocator's exact byte count; repeated runs on this machine gave
the same value to 0.01 MiB (2026-11-30, torch 2.13.0). They change only when the code or torch's
kernels change what a step allocates: 1 % absorbs small kernel changes and still catches a term the
model dropped (the smallest activation term of these models, the attention output, is 2 % of the peak).
"""

import json
import os

import pytest

from tests.helpers.warm import run_python

SMALL = [
    "model.hidden_size=256",
    "model.ffn_hidden_size=704",
    "model.num_attention_heads=4",
    "model.seq_length=512",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
]
MEASURED_REL = 0.01
PREDICTED_REL = 0.10


def _bench(nproc: int, *overrides: str) -> list[dict]:
    args = ["-m", "benchmarks.bench_memory", "--recipe", "tiny_gpt", *SMALL, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [] if nproc == 1 else ["-m", "tests.helpers.forkrun", str(nproc)]  # torchrun's ranks, forked warm
    proc = run_python([*launcher, *args], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(line: dict, measured_mib: float, static_mib: float) -> None:
    assert line["measured_mib"] == pytest.approx(measured_mib, rel=MEASURED_REL)
    assert line["static_measured_mib"] == pytest.approx(static_mib, rel=MEASURED_REL)
    assert abs(line["predicted_mib"] / line["measured_mib"] - 1) <= PREDICTED_REL


@pytest.mark.slow
def test_one_process_fp32():
    (line,) = _bench(1)
    assert line["predicted_mib"] == pytest.approx(154.01, abs=0.01)  # the model itself, pinned exactly
    _check(line, measured_mib=153.82, static_mib=48.23)


@pytest.mark.slow
def test_tensor_2_sequence_parallel_bf16():
    lines = _bench(2, "parallel.tensor=2", "parallel.sequence_parallel=true", "train.precision=bf16")
    assert [line["rank"] for line in lines] == [0, 1]
    for line in lines:
        assert line["predicted_mib"] == pytest.approx(59.32, abs=0.01)
        _check(line, measured_mib=60.46, static_mib=27.73)

"""Fault guards end to end: a non-finite step is skipped (the model untouched) or stops the run, the
watchdog reports a stalled phase, and a preemption signal stops every rank at one step with a
checkpoint and exit code 75, from which `checkpoint.load=auto` continues the same loss curve."""

import math
import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from pretrain.guards import EXIT_NONFINITE, EXIT_PREEMPTED, NonfiniteGuard
from tests.helpers.runs import REPO, assert_close_curves, read_metrics, run_pretrain, tiny_overrides

TIMEOUT_S = 300


def _model_and_adam_tensors(ckpt) -> dict:
    """Every tensor of a checkpoint (weights, Adam moments), read with torch's own DCP reader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = ckpt.parent / (ckpt.name + ".pt")
    dcp_to_torch_save(str(ckpt), str(flat))
    state = torch.load(flat, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# -------------------------------------------------------------------------------- non-finite guard


@pytest.fixture(scope="module")
def nan_and_stall(synthetic_corpus, tmp_path_factory):
    """One process, 6 steps, a checkpoint after each: step 2 stalls 2 s under a 0.5 s watchdog,
    step 3's loss is NaN, step 5 has a NaN gradient on a finite loss."""
    log_dir = tmp_path_factory.mktemp("nan_and_stall")
    proc = run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus,
            log_dir,
            "train.steps=6",
            "checkpoint.interval=1",
            "train.watchdog_timeout_s=0.5",
            "debug.stall_at_step=2",
            "debug.stall_s=2",
            "debug.nan_loss_at_step=3",
            "debug.nan_grad_at_step=5",
        ),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return log_dir, proc


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_leaves_the_model_untouched(nan_and_stall, reference):
    log_dir, proc = nan_and_stall
    assert (
        "warning: non-finite loss or gradients at step 3 (loss nan): step skipped, "
        "1 of at most 10 (train.max_skipped_steps)"
    ) in proc.stderr.splitlines()
    metrics = read_metrics(log_dir)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert_close_curves(metrics[:2], reference[1][:2], rel=1e-5)  # before the fault: the reference run
    assert math.isnan(metrics[2]["loss"]) and metrics[2]["skipped"] is True
    assert [r["nonfinite_steps"] for r in metrics] == [0, 0, 1, 1, 2, 2]
    assert math.isfinite(metrics[3]["loss"]) and "skipped" not in metrics[3]  # the run goes on
    # A skipped step uses up its lr slot: every step trains at the reference's lr of the same step.
    assert [r["lr"] for r in metrics] == [r["lr"] for r in reference[1][:6]]
    ckpts = log_dir / "checkpoints"
    before, after = (_model_and_adam_tensors(ckpts / f"iter_000000{s}") for s in (2, 3))
    assert before.keys() == after.keys() and any(k.startswith("optimizer.state.exp_avg") for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    last = _model_and_adam_tensors(ckpts / "iter_0000004")
    assert not torch.equal(last["output_layer.weight"], after["output_layer.weight"])


def test_nonfinite_gradient_with_a_finite_loss_is_skipped_too(nan_and_stall):
    """The gradient half of the guard: step 5's loss is finite, one gradient element on rank 0 is
    NaN; the step is skipped and the model and Adam state stay as they were after step 4."""
    log_dir, proc = nan_and_stall
    fifth = read_metrics(log_dir)[4]
    assert math.isfinite(fifth["loss"]) and fifth["skipped"] is True and math.isnan(fifth["grad_norm"])
    assert (
        f"non-finite loss or gradients at step 5 (loss {fifth['loss']}): step skipped, 2 of at most 10" in proc.stderr
    )
    ckpts = log_dir / "checkpoints"
    before, after = (_model_and_adam_tensors(ckpts / f"iter_000000{s}") for s in (4, 5))
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_watchdog_reports_the_stalled_phase_with_stacks(nan_and_stall):
    log_dir, proc = nan_and_stall
    reports = re.findall(
        r"^watchdog: rank 0 step (\d+) phase (\w+) running for ([\d.]+) s "
        rf"\(train.watchdog_timeout_s = 0.5\); details in {re.escape(str(log_dir / 'watchdog'))}$",
        proc.stderr,
        re.M,
    )
    # A loaded machine may stall other phases past 0.5 s too; the 2 s sleep is reported every 0.5 s.
    stalled = [float(elapsed) for step, phase, elapsed in reports if (step, phase) == ("2", "forward_backward")]
    assert len(stalled) >= 2 and 0.5 <= stalled[0] < 1.0, proc.stderr
    # The hang report of one rank: where its main thread is, then every thread's stack in its file.
    assert re.search(
        r"^  rank 0 \(step 2 forward_backward, [\d.]+ s\): in no collective, at pretrain/faults.py:\d+ in around$",
        proc.stderr,
        re.M,
    ), proc.stderr
    block = (log_dir / "watchdog" / "rank_0.txt").read_text()
    assert "most recent call first" in block
    assert re.search(r'File ".*pretrain/faults.py", line \d+ in around', block)
    assert re.search(r'File ".*pretrain/step.py", line \d+ in _train', block)


def test_nonfinite_stop_is_one_line_and_exit_code_3(synthetic_corpus, tmp_path):
    proc = run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus, tmp_path, "train.steps=3", "train.on_nonfinite=stop", "debug.nan_loss_at_step=2"
        ),
        check=False,
    )
    assert proc.returncode == EXIT_NONFINITE == 3, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: non-finite loss or gradients at step 2 (loss nan), the model was not updated; "
        "stopping (train.on_nonfinite = stop)"
    ]
    metrics = read_metrics(tmp_path)
    assert [r["step"] for r in metrics] == [1, 2] and metrics[1]["skipped"] is True
    assert not (tmp_path / "checkpoints").exists()  # nothing saved after the fault


@pytest.mark.slow
def test_skipped_steps_count_across_resumes_and_one_too_many_exits_3(synthetic_corpus, tmp_path):
    """train.max_skipped_steps = 1: the first job skips step 2 and saves at step 3 with one skipped
    step recorded; the resumed job's second skip (step 5) is one too many: exit 3, one line."""
    first = run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus, tmp_path, "train.steps=3", "train.max_skipped_steps=1", "debug.nan_loss_at_step=2"
        ),
        check=False,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(
            synthetic_corpus,
            tmp_path,
            "train.steps=6",
            "train.max_skipped_steps=1",
            "debug.nan_loss_at_step=5",
            "checkpoint.load=auto",
        ),
        check=False,
    )
    assert second.returncode == EXIT_NONFINITE, second.stderr[-3000:]
    assert second.stderr.splitlines() == [
        "error: non-finite loss or gradients at step 5 (loss nan), the model was not updated; "
        "2 steps skipped, more than train.max_skipped_steps = 1: stopping"
    ]
    assert [r["nonfinite_steps"] for r in read_metrics(tmp_path)] == [0, 1, 1, 1, 2]


@pytest.mark.slow
def test_fp16_trains_and_its_guard_skips_a_nan_loss(reference, synthetic_corpus, tmp_path):
    """fp16 with megatron-core's dynamic loss scale: the run trains (close to fp32, not equal to it)
    and the guard, which checks only the loss in fp16, skips the step whose loss is NaN."""
    proc = run_pretrain(
        1,
        "tiny_gpt",
        tiny_overrides(synthetic_corpus, tmp_path, "train.precision=fp16", "train.steps=6", "debug.nan_loss_at_step=4"),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics[3]["skipped"] is True and math.isnan(metrics[3]["loss"])
    fp32 = reference[1]
    for step in (0, 1, 2):  # before the fault: within fp16's precision of fp32, and not equal to it
        gap = abs(metrics[step]["loss"] - fp32[step]["loss"]) / fp32[step]["loss"]
        assert 0 < gap < 1e-2, (step, metrics[step]["loss"], fp32[step]["loss"])
    assert all(math.isfinite(r["loss"]) and "skipped" not in r for r in metrics[4:])


@pytest.mark.slow
def test_sigterm_to_a_single_process_saves_and_exits_75(synthetic_corpus, tmp_path):
    """Without torchrun: pretrain_gpt.py itself stops after the current step, saves, exits 75."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.Popen(
        [
            sys.executable,
            "pretrain_gpt.py",
            "--recipe",
            "tiny_gpt",
            *tiny_overrides(synthetic_corpus, tmp_path, "debug.stall_at_step=2", "debug.stall_s=3"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rc, _, stderr = _interrupt_after_first_step(proc, lambda: proc.send_signal(signal.SIGTERM))
    assert _stopped_step(rc, stderr, tmp_path / "checkpoints") == 2
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.slow  # the launcher's own process and its ranks' fresh interpreters
def test_nonfinite_stop_through_the_launcher_exits_3(synthetic_corpus, tmp_path):
    """`python -m pretrain.launch` exits with the code its workers agree on (plain torchrun: 1)."""
    launcher = _launch(
        tiny_overrides(
            synthetic_corpus, tmp_path, "train.steps=3", "train.on_nonfinite=stop", "debug.nan_loss_at_step=2"
        )
    )
    _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == EXIT_NONFINITE, stderr[-3000:]
    assert "error: non-finite loss or gradients at step 2" in stderr and "Traceback" not in stderr


def test_skipping_is_bounded():
    guard = NonfiniteGuard("skip", max_skipped=1, skipped=0)
    assert guard.count(5, float("inf")) is None
    assert guard.count(9, float("nan")) == (
        "non-finite loss or gradients at step 9 (loss nan), the model was not updated; "
        "2 steps skipped, more than train.max_skipped_steps = 1: stopping"
    )


# ------------------------------------------------------------------------------------- preemption


@pytest.mark.parametrize(
    "codes, expected",
    [
        ([75, 75], 75),
        ([75, -signal.SIGTERM], 75),
        ([-signal.SIGKILL, 3], 3),
        ([2], 2),
        ([75, 1], None),
        ([75, 3], None),
        ([130, 130], 130),
        ([130, -signal.SIGTERM], 130),
        ([-signal.SIGTERM], None),
        ([1], None),
    ],
)
def test_launcher_exit_code_is_the_one_the_workers_agree_on(codes, expected):
    from types import SimpleNamespace

    from pretrain.launch import exit_code_of

    assert exit_code_of({rank: SimpleNamespace(exitcode=code) for rank, code in enumerate(codes)}) == expected


def _launch(overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    cmd = [
        sys.executable,
        "-m",
        "pretrain.launch",
        "--standalone",
        "--nproc_per_node=2",
        "pretrain_gpt.py",
        "--recipe",
        "tiny_gpt",
        *overrides,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no worker of rank {rank}")


def _interrupt_after_first_step(launcher: subprocess.Popen, send) -> tuple:
    """Waits for the first progress line, calls `send`, returns (exit code, stdout, stderr)."""
    seen = []
    for line in launcher.stdout:
        seen.append(line)
        if line.startswith("step "):
            send()
            break
    out, err = launcher.communicate(timeout=TIMEOUT_S)
    return launcher.returncode, "".join(seen) + out, err


def _stopped_step(rc: int, stderr: str, ckpt_dir) -> int:
    """The step a preempted run stopped after; checks exit code, message and checkpoint."""
    assert rc == EXIT_PREEMPTED == 75, stderr[-5000:]
    match = re.search(
        r"^stopped: preemption signal: stopped after step (\d+), saved (\S+); "
        r"resume with checkpoint.load=auto \(exit code 75\)$",
        stderr,
        re.M,
    )
    assert match, stderr[-5000:]
    step = int(match.group(1))
    assert match.group(2) == str(ckpt_dir / f"iter_{step:07d}")
    assert (ckpt_dir / f"iter_{step:07d}" / "metadata.json").is_file()
    assert (ckpt_dir / "latest").read_text().strip() == f"iter_{step:07d}"
    return step


@pytest.mark.slow
def test_preempted_twice_then_resumed_continues_the_same_curve(reference, synthetic_corpus, tmp_path):
    """SIGUSR1 to the launcher (forwarded to both workers), then, in the resumed run, SIGTERM to
    rank 1 alone: both ranks agree on the stop step each time. The third run finishes; the one
    metrics.jsonl equals the uninterrupted single-process run."""
    overrides = tiny_overrides(synthetic_corpus, tmp_path, "checkpoint.load=auto")
    ckpts = tmp_path / "checkpoints"
    launcher = _launch(overrides)
    rc, _, err = _interrupt_after_first_step(launcher, lambda: launcher.send_signal(signal.SIGUSR1))
    first = _stopped_step(rc, err, ckpts)
    launcher = _launch(overrides)
    rc, out, err = _interrupt_after_first_step(launcher, lambda: _worker(launcher, 1).send_signal(signal.SIGTERM))
    second = _stopped_step(rc, err, ckpts)
    assert f"resumed from {ckpts / f'iter_{first:07d}'} at step {first}" in out
    assert first < second < 10, (first, second)
    launcher = _launch(overrides)
    out, err = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == 0, err[-5000:]
    assert_close_curves(read_metrics(tmp_path), reference[1], rel=1e-5)

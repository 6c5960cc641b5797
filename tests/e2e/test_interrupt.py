"""Ctrl-C as a terminal sends it (SIGINT to the foreground process group): the first one finishes the
step, saves and exits 130 with one line, in one process, under `python -m pretrain.launch` and under
plain torchrun; `checkpoint.load=auto` continues the same loss curve. A second Ctrl-C stops at once."""

import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from common.errors import EXIT_INTERRUPTED
from tests.helpers.runs import REPO, assert_close_curves, read_metrics, tiny_overrides

TIMEOUT_S = 300


def _start(runner: list, overrides: list) -> subprocess.Popen:
    """pretrain_gpt.py under `runner` in a process group of its own, as a terminal's foreground job."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
    cmd = [sys.executable, *runner, "pretrain_gpt.py", "--recipe", "tiny_gpt", *overrides]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _ctrl_c(proc: subprocess.Popen, times: int = 1) -> tuple:
    """Ctrl-C `times` times (0.5 s apart) after the first progress line; returns (exit code,
    stdout, stderr, seconds from the last Ctrl-C to the exit)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step "):
            for k in range(times):
                time.sleep(0.5 if k else 0)
                os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
            break
    sent = time.monotonic()
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, "".join(seen) + out, err, time.monotonic() - sent


def _saved_step(stderr: str, ckpt_dir) -> int:
    match = re.search(
        r"^interrupted: Ctrl-C: stopped after step (\d+), saved (\S+); "
        r"resume with checkpoint.load=auto \(exit code 130\)$",
        stderr,
        re.M,
    )
    assert match, stderr[-5000:]
    step = int(match.group(1))
    assert match.group(2) == str(ckpt_dir / f"iter_{step:07d}")
    assert (ckpt_dir / "latest").read_text().strip() == f"iter_{step:07d}"
    return step


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_the_resumes_continue_the_curve(reference, synthetic_corpus, tmp_path):
    """One process, then `pretrain.launch` with 2 ranks, then plain torchrun with 2 ranks, each
    resuming the last one's checkpoint and Ctrl-C'd after its first step. Under plain torchrun the
    ranks save and say so the same way; torchrun itself then exits 1 with its own SignalException
    traceback (torch's launcher, not ours: pretrain.launch is the launcher that exits 130)."""
    overrides = tiny_overrides(synthetic_corpus, tmp_path, "checkpoint.load=auto")
    ckpts = tmp_path / "checkpoints"
    launch = ["-m", "pretrain.launch", "--standalone", "--nproc_per_node=2"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    rc, _, err, _ = _ctrl_c(_start([], overrides))
    assert rc == EXIT_INTERRUPTED == 130 and len(err.splitlines()) == 1, err[-5000:]
    first = _saved_step(err, ckpts)

    rc, out, err, _ = _ctrl_c(_start(launch, overrides))
    assert rc == 130 and len(err.splitlines()) == 1, err[-5000:]
    assert f"resumed from {ckpts / f'iter_{first:07d}'} at step {first}" in out
    second = _saved_step(err, ckpts)

    rc, out, err, _ = _ctrl_c(_start(torchrun, overrides))
    assert rc == 1, err[-5000:]
    third = _saved_step(err, ckpts)
    assert err.count("Traceback") == 1 and err.rstrip().endswith("got signal: 2"), err[-5000:]
    assert "KeyboardInterrupt" not in err and "[rank" not in err, err[-5000:]
    assert 0 < first < second < third < 10, (first, second, third)
    # Every step once, each equal to the uninterrupted single-process run's.
    assert_close_curves(read_metrics(tmp_path), reference[1][:third], rel=1e-5)


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_with_one_line(synthetic_corpus, tmp_path):
    """Step 2 sleeps 60 s (debug.stall): the first Ctrl-C would wait for it, the second ends the run
    at once, without a traceback, without saving."""
    overrides = tiny_overrides(synthetic_corpus, tmp_path, "debug.stall_at_step=2", "debug.stall_s=60")
    rc, _, err, after = _ctrl_c(_start([], overrides), times=2)
    assert rc == EXIT_INTERRUPTED, err[-5000:]
    assert err.splitlines() == [
        "interrupted: second Ctrl-C, stopped at once during step 2 without saving it; "
        "checkpoint.load=auto resumes from the last checkpoint (exit code 130)"
    ]
    assert after < 10, after
    assert not (tmp_path / "checkpoints").exists()


def test_ctrl_c_outside_the_steps_is_one_line(monkeypatch, capsys):
    """Ctrl-C while the process starts (imports, process groups, data) or tears down."""
    from pretrain import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["--recipe", "tiny_gpt"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.splitlines() == [
        "interrupted: Ctrl-C outside the training steps, stopped at once (exit code 130)"
    ]


def test_launcher_leaves_sigint_to_the_workers_and_quiets_an_agreed_stop():
    from pretrain.launch import _QuietAgreedStop, agent_signals

    assert agent_signals("SIGTERM,SIGINT,SIGHUP,SIGQUIT") == "SIGHUP,SIGQUIT"

    def record(msg, *args):
        return logging.LogRecord("torch", logging.WARNING, "api.py", 1, msg, args, None)

    quiet = _QuietAgreedStop()
    failed = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"
    assert not quiet.filter(record(failed, 130, 1, 42, "python"))
    assert not quiet.filter(record(failed, 75, 1, 42, "python"))
    assert quiet.filter(record(failed, 1, 1, 42, "python"))
    assert not quiet.filter(record("Sending process %s closing signal %s", 42, "SIGTERM"))
    assert quiet.filter(record("Sending process %s closing signal %s", 42, "SIGKILL"))

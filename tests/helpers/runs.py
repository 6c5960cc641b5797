"""Runs pretrain_gpt.py the way users do (torchrun, N gloo processes) and reads back its metrics."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

from tests.helpers.warm import run_python

REPO = pathlib.Path(__file__).resolve().parents[2]


TINY_STEPS = 10


# Equivalence runs train on data whose loss-token counts differ between micro-batches and ranks (no
# loss on predictions made at an EOD; documents of 20 to 300 tokens in 128-token samples), so a
# mean of per-batch means would not equal the token mean and a wrong normalization shows; and they
# validate (on a 10 % share) twice, so evaluation is checked at every layout too.
MASKED = ("data.eod_mask_loss=true", "data.split=90,10,0", "train.eval_interval=5", "train.eval_steps=2")


def tiny_overrides(corpus: str, log_dir, *extra: str) -> list:
    """tiny_gpt for TINY_STEPS steps on the synthetic corpus, without wandb."""
    return [
        f"data.path={corpus}",
        f"logging.dir={log_dir}",
        "logging.wandb.mode=disabled",
        f"train.steps={TINY_STEPS}",
        *extra,
    ]


def run_pretrain(
    nproc: int, recipe: str, overrides: Sequence[str], timeout: int = 300, check: bool = True, launcher: bool = False
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N pretrain_gpt.py --recipe R overrides...` (1 = plain
    python; `launcher`: `python -m pretrain.launch` instead of torchrun). `check`: fail unless exit 0;
    such runs fork their ranks from one process (tests/helpers/forkrun.py) instead of torchrun."""
    if nproc == 1 and not launcher:
        cmd = [sys.executable, "pretrain_gpt.py"]
    elif check and not launcher:
        # expected to succeed: the ranks forked after one import (tests/helpers/forkrun.py)
        cmd = [sys.executable, "-m", "tests.helpers.forkrun", str(nproc)]
    else:
        runner = "pretrain.launch" if launcher else "torch.distributed.run"
        cmd = [sys.executable, "-m", runner, "--standalone", f"--nproc_per_node={nproc}", "pretrain_gpt.py"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
    args = [*cmd[1:], "--recipe", recipe, *overrides]
    if launcher or not check and nproc > 1:  # the launchers themselves are under test: real processes
        proc = subprocess.run([cmd[0], *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        proc = run_python(args, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        # A rank's one-line error can sit far above torchrun's failure summary: name it first.
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
        raise AssertionError(
            f"exit {proc.returncode}\nerror lines:\n"
            + "\n".join(said[:20])
            + f"\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def read_metrics(log_dir: pathlib.Path) -> list[dict]:
    with open(log_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_close_curves(actual: list[dict], expected: list[dict], rel: float, keys=("loss", "grad_norm")) -> None:
    """Same steps, and each key within `rel` relative difference at every step; a key holding a list
    or a mapping (e.g. the per-layer, per-expert load) is compared entry by entry."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected):
        for key in keys:
            _assert_close(a[key], e[key], rel, f"step {a['step']} {key}")


def assert_close_validation(actual: list[dict], expected: list[dict], rel: float) -> None:
    """val_loss at the same steps, within `rel` relative."""
    got = [(r["step"], r["val_loss"]) for r in actual if "val_loss" in r]
    want = [(r["step"], r["val_loss"]) for r in expected if "val_loss" in r]
    assert [s for s, _ in got] == [s for s, _ in want] and want, (got, want)
    for (step, a), (_, e) in zip(got, want):
        _assert_close(a, e, rel, f"step {step} val_loss")


def _assert_close(actual, expected, rel: float, where: str) -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), f"{where}: keys {sorted(actual)} vs {sorted(expected)}"
        for name in expected:
            _assert_close(actual[name], expected[name], rel, f"{where}[{name}]")
        return
    if isinstance(expected, list):
        assert len(actual) == len(expected), f"{where}: {len(actual)} entries vs {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_close(a, e, rel, f"{where}[{i}]")
        return
    diff = abs(actual - expected) / max(abs(expected), 1e-12)
    assert diff <= rel, f"{where}: {actual!r} vs {expected!r} (rel {diff:.2e} > {rel})"

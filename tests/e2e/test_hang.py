"""Hang forensics end to end: 4 ranks (tensor 2 x data 2), rank 3 never enters the first collective of
step 2's forward/backward (debug.hang_*); within the watchdog's timeout + 10 s rank 0 names rank 3, the
collective rank 2 waits in, and where rank 3 is instead."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers.runs import REPO, tiny_overrides

WATCHDOG_S = 6  # above a tiny step's time with 4 ranks on a loaded 2-core machine


@pytest.mark.slow
def test_hang_report_names_the_rank_that_never_entered_the_collective(synthetic_corpus, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true")
    overrides = tiny_overrides(
        synthetic_corpus,
        tmp_path,
        "parallel.tensor=2",
        "checkpoint.save=false",
        f"train.watchdog_timeout_s={WATCHDOG_S}",
        "debug.hang_at_step=2",
        "debug.hang_rank=3",
        "debug.hang_phase=forward_backward",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.forkrun", "4", "--recipe", "tiny_gpt", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    killer = threading.Timer(240, os.killpg, (proc.pid, signal.SIGKILL))  # the run never ends by itself
    killer.start()
    seen, hung_at, reported_at = [], None, None
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("debug: rank 3 does not enter all_reduce at step 2 phase forward_backward"):
                hung_at = time.monotonic()
            if line.startswith("watchdog: hang report: rank 3"):
                reported_at = time.monotonic()
                break
        summary = [line for line in seen if line.startswith("  rank ")]  # lines of earlier reports too
        for line in proc.stderr:  # the rest of the block
            if not line.startswith("  "):
                break
            summary.append(line)
    finally:
        killer.cancel()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = "".join(seen)
    assert hung_at is not None and reported_at is not None, text[-5000:]
    assert reported_at - hung_at < WATCHDOG_S + 10, reported_at - hung_at
    assert re.fullmatch(
        r"watchdog: hang report: rank 3 never entered all_reduce #\d+ on data parallel group with cp \[1, 3\], "
        r"which rank 1 waits in, nor all_reduce #\d+ on tensor model parallel group \[2, 3\], which rank 2 waits "
        r"in; rank 3 is at pretrain/faults.py:\d+ in before_entering \(step 2 forward_backward\)\n",
        seen[-1],
    ), seen[-1]
    assert any(
        re.fullmatch(
            r"  rank 2 \(step 2 forward_backward, [\d.]+ s\): waits in all_reduce #\d+ on tensor model parallel "
            r"group \[2, 3\] \(float32 \[2, 128, 64\]\) at megatron/core/tensor_parallel/mappings.py:\d+ in _reduce; "
            r"never entered it: rank 3\n",
            line,
        )
        for line in summary
    ), summary
    watchdog = tmp_path / "watchdog"
    assert (watchdog / "summary.txt").read_text().count("watchdog: hang report: rank 3 never entered") == 1
    for rank in range(4):
        block = (watchdog / f"rank_{rank}.txt").read_text()
        assert block.startswith(f"rank {rank}: step ") and "Python stacks:" in block, block[:2000]
    assert "before_entering" in (watchdog / "rank_3.txt").read_text()

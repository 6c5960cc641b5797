"""`python -m data.preprocess text` killed with SIGKILL at two moments (after a part, after about half
of them), each time rerun with the same command, ends with the uninterrupted run's
exact .bin/.idx, without tokenizing again the parts done before a kill; the killed run's tokenizer
processes die with it."""

import os
import signal
import subprocess
import sys
import time

import pytest

from data.preprocess import main
from tests.helpers.corpora import TEXTS, file_bytes, write_jsonl
from tests.helpers.runs import REPO

PART_BYTES = 6000
TIMEOUT_S = 120


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(child) for child in file.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _done_parts(folder) -> int:
    return len([p for p in folder.glob("*.json") if p.name != "plan.json"]) if folder.exists() else 0


def _run_and_kill(argv, parts_folder, at_least: int) -> int:
    """Starts the command, SIGKILLs it once `at_least` parts are committed, checks its workers died
    too; returns the parts done at the kill."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not ((parts_folder / "plan.json").exists() and _done_parts(parts_folder) >= at_least):
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "a tokenizer process outlived the killed run"
    return _done_parts(parts_folder)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_at_any_moment_then_rerun_gives_the_same_bytes(tmp_path, bpe_path, capsys):
    write_jsonl(tmp_path / "rows.jsonl", TEXTS * 20)
    options = ["--input", str(tmp_path / "rows.jsonl"), "--tokenizer", bpe_path, "--part-bytes", str(PART_BYTES)]
    assert main(["text", *options, "--output-prefix", str(tmp_path / "whole")]) == 0
    total = len(list(range(0, (tmp_path / "rows.jsonl").stat().st_size, PART_BYTES)))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "data.preprocess", "text", *options, "--workers", "2", "--output-prefix", str(out)]
    done = 0
    for at_least in (1, total // 2):
        done = _run_and_kill(argv, tmp_path / "out.parts", max(at_least, done))
        assert not out.with_suffix(".bin").exists()
    assert 0 < done < total + 1
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    resumed = int(proc.stdout.rsplit("resumed: ", 1)[1].split()[0])
    assert resumed >= done, proc.stdout  # none of the parts done before the last kill was redone
    assert file_bytes(str(out)) == file_bytes(str(tmp_path / "whole"))
    assert not (tmp_path / "out.parts").exists()

"""scripts/quickstart.sh end to end, as the README runs it (fewer steps, its own logging folder):
the set-up is a no-op on a ready .venv, the corpus is built from the standard library (or kept),
and tiny_gpt trains on 2 processes under torchrun; the generate command it prints at the end runs."""

import os
import shlex
import subprocess

import pytest

from tests.helpers.runs import REPO, read_metrics


@pytest.mark.slow
def test_quickstart_builds_its_corpus_and_trains(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", f"logging.dir={tmp_path}", "train.steps=2", "logging.wandb.mode=disabled"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "runs/quickstart/corpus/text_document.bin/.idx" in proc.stdout
    assert "final loss" in proc.stdout
    metrics = read_metrics(tmp_path)
    assert [r["step"] for r in metrics] == [1, 2] and metrics[-1]["loss"] < metrics[0]["loss"]
    assert (tmp_path / "checkpoints" / "iter_0000002").is_dir()
    printed = proc.stdout.rstrip().splitlines()[-1]
    assert printed.startswith(f"generate text from it: .venv/bin/python -m tools.generate --checkpoint {tmp_path}/")
    command = shlex.split(printed.split(": ", 1)[1]) + ["--max-new-tokens", "8"]
    generated = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0 and generated.stdout.startswith("def main("), generated.stderr[-3000:]

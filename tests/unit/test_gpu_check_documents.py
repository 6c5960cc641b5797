"""scripts/gpu_check.py's document-masking row: on a GPU machine without flash-attn it is skipped
with its reason (not a failure), and with flash-attn it refuses to time anything else."""

import importlib.util
import pathlib

import pytest

from benchmarks import gpu_check
from tests.helpers.warm import run_python


def test_documents_row_is_skipped_without_flash_attn(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    checks = {c.name: c for c in gpu_check._checks(pathlib.Path(tmp_path), "corpus", smoke=False)}
    row = checks["documents_flash_varlen_seq8192"]
    assert row.skip == "flash-attn is not installed" and "--require-flash" in row.command
    gpu_check._run(row, tmp_path)
    assert row.result["rc"] == 0 and gpu_check._summary(row, 1.0, smoke=False) == "skipped: flash-attn is not installed"


@pytest.mark.slow  # a process that imports torch
def test_bench_documents_refuses_without_flash_attn_in_one_line():
    proc = run_python(["-m", "benchmarks.bench_documents", "--require-flash"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --require-flash: flash-attn is not installed (or no --device cuda)"

"""scripts/gpu_check.sh --smoke: every part of the GPU check (training runs of the 1B recipe with and
without recompute (the 3B one is the same code at the same tiny shapes), the FP8 path, the ring
against one call, the SDPA kernel, grouped against sequential experts, tiny_deepseek with MTP and
grouped experts, the memory model against the allocator) runs end to end with tiny shapes on a CPU, so the script a lent GPU runs never rots."""

import json
import subprocess

import pytest

from tests.helpers.runs import REPO


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part(tmp_path):
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = {
        "llama_1b_bf16",
        "llama_1b_bf16_recompute_full",
        "llama_1b_fp8_tensorwise",
        "ring_cp2_vs_one_call",
        "sdpa_kernel_llama_1b",
        "moe_grouped_vs_sequential_experts",
        "tiny_deepseek_mtp_grouped_experts",
        "memory_model_llama_1b",
        "documents_flash_varlen_seq8192",
        "llama_1b_tp2_sp",  # skipped at --smoke (userbuffers need GPUs), reported as a row
        "llama_1b_tp2_tp_comm_overlap",
    }
    assert expected <= set(summary), sorted(summary)
    for name in expected:
        assert summary[name]["rc"] == 0, name
    for name in ("llama_1b_bf16", "llama_1b_bf16_recompute_full", "tiny_deepseek_mtp_grouped_experts"):
        assert summary[name]["tokens_per_s"] > 0 and 0 < summary[name]["mfu"]
    table = proc.stdout.split("\n\n")[-1]
    assert table.splitlines()[0].startswith("matmul_peak")
    assert len(table.strip().splitlines()) == len(expected) + 1

"""The GPU measurements of one machine in one command (scripts/gpu_check.sh runs this): the measured
bf16 matmul peak, which SDPA kernel runs, bf16 step time and MFU of Llama-3.2-1B and -3B at sequence
4096 (recompute off and on), the FP8 local path against bf16, the ring at CP 2 against one attention
call, attention inside documents (flash-attn varlen against one causal call at sequence 8192;
skipped without flash-attn), grouped-GEMM experts against sequential ones in a Qwen3-30B-A3B-shaped
MoE layer, tiny_deepseek's step time (MLA, group routing, MTP, grouped experts), tensor-parallel
communication overlap (TE userbuffers, two GPUs) against none at TP 2, and the memory model against
the allocator's peak. `--smoke` runs every part with tiny
shapes on a CPU (the test suite does, so the script never rots). One table last; logs under --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from benchmarks.common import REPO


@dataclass
class Check:
    """One row of the table: a command, where its log goes, and how its figure is read from it."""

    name: str
    command: list[str]
    read: str  # how the figure comes out of the run: "metrics" (metrics.jsonl), "stdout"
    log_dir: pathlib.Path | None = None
    result: dict = field(default_factory=dict)
    skip: str | None = None  # why this machine cannot run it (reported, not a failure)


def matmul_peak_tflops(smoke: bool) -> float:
    """Best of a few large bf16 matmuls on the GPU (fp32 and small on a CPU), in TFLOP/s."""
    import torch

    device = torch.device("cpu" if smoke else "cuda")
    n, dtype, repeats = (256, torch.float32, 3) if smoke else (8192, torch.bfloat16, 20)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best / 1e12


def _train(name: str, out: pathlib.Path, corpus: str, recipe: str, smoke: bool, *extra: str) -> Check:
    log_dir = out / name
    if recipe.startswith("tiny_"):  # already CPU-sized: at --smoke, one micro-batch of 64 tokens
        tiny = ["train.steps=1", "train.global_batch_size=2", "model.seq_length=64", "train.device=cpu"]
        sizes = tiny if smoke else ["train.steps=12", "train.precision=bf16"]
    else:
        sizes = _large_sizes(recipe, smoke, *extra)
    command = [
        sys.executable,
        "pretrain_gpt.py",
        "--recipe",
        recipe,
        f"data.path={corpus}",
        f"logging.dir={log_dir}",
        "logging.wandb.mode=disabled",
        "checkpoint.save=false",
        *[s for s in sizes if s],
        *extra,
    ]
    return Check(name, command, "metrics", log_dir)


def _large_sizes(recipe: str, smoke: bool, *extra: str) -> list[str]:
    """A 1B/3B recipe's own shapes on a GPU; at --smoke, tiny_gpt's."""
    return (
        [
            # tiny_gpt's shapes: the 1B/3B recipes' 128K vocabulary alone is 8 GB of fp32 state
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.ffn_hidden_size=176",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.vocab_size=384",
            "model.seq_length=128",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "train.steps=3",
            "train.device=cpu",
            "train.precision=fp32" if "fp8.enabled=true" not in extra else "",
        ]
        if smoke
        else ["train.steps=12", "train.global_batch_size=" + ("8" if recipe == "llama_1b" else "4")]
    )


def _read_metrics(check: Check, peak: float, smoke: bool) -> dict:
    """Median step time after the warm-up steps, tokens/s, MFU against the measured peak."""
    from model.gpt import padded_vocab_size
    from pretrain.metrics import flops_per_token
    from pretrain.recipe import load_recipe

    assert check.log_dir is not None
    records = [json.loads(line) for line in (check.log_dir / "metrics.jsonl").read_text().splitlines() if line]
    steady = records[2:] if len(records) > 3 else records[-1:]
    step_time = statistics.median(r["step_time_s"] for r in steady)
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    recipe = load_recipe(str(check.log_dir / "recipe.yaml"))
    vocab = padded_vocab_size(recipe.model, recipe.model.vocab_size or 257, 1)
    tflops = flops_per_token(recipe.model, vocab) * tokens_per_s / 1e12
    return {
        "step_s": step_time,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": tflops / peak,
        "loss": records[-1]["loss"],
    }


def _checks(out: pathlib.Path, corpus: str, smoke: bool) -> list[Check]:
    py = sys.executable
    checks = []
    # At --smoke both recipes shrink to the same tiny shapes: the 3B rows would repeat the 1B ones.
    for recipe in ("llama_1b",) if smoke else ("llama_1b", "llama_3b"):
        checks.append(_train(f"{recipe}_bf16", out, corpus, recipe, smoke))
        checks.append(
            _train(
                f"{recipe}_bf16_recompute_full",
                out,
                corpus,
                recipe,
                smoke,
                "model.recompute_granularity=full",
                "model.recompute_method=uniform",
                "model.recompute_num_layers=1",
            )
        )
    checks.append(
        _train(
            "llama_1b_fp8_tensorwise",
            out,
            corpus,
            "llama_1b",
            smoke,
            "fp8.enabled=true",
            "fp8.recipe=tensorwise",
            "train.precision=bf16",
        )
    )
    ring = [py, "-m", "benchmarks.bench_ring_attention", "--simulate-cp", "2"]
    ring += ["--seq", "256", "--iters", "1"] if smoke else ["--device", "cuda", "--dtype", "bf16", "--seq", "32768"]
    checks.append(Check("ring_cp2_vs_one_call", ring, "stdout"))
    sdpa = [py, "-m", "benchmarks.sdpa_kernel"] + (
        ["--smoke"] if smoke else ["--heads", "32", "--groups", "8", "--head-dim", "64", "--seq", "4096"]
    )
    checks.append(Check("sdpa_kernel_llama_1b", sdpa, "stdout"))
    # attention inside documents: flash-attn's varlen kernel against one causal call (and the ring's
    # skipped blocks), on the synthetic corpus's document lengths
    documents = [py, "-m", "benchmarks.bench_documents"] + (
        ["--seq", "256", "--iters", "1", "--cp", "2"]
        if smoke
        else ["--device", "cuda", "--dtype", "bf16", "--seq", "8192", "--require-flash"]
    )
    no_flash = not smoke and importlib.util.find_spec("flash_attn") is None
    checks.append(
        Check(
            "documents_flash_varlen_seq8192",
            documents,
            "stdout",
            skip="flash-attn is not installed" if no_flash else None,
        )
    )
    # one Qwen3-30B-A3B-shaped MoE layer (hidden 2048, 128 experts, top-8, expert ffn 768), bf16
    experts = [py, "-m", "benchmarks.bench_moe_experts"]
    experts += (
        ["--smoke"]
        if smoke
        else ["--device", "cuda", "--dtype", "bf16", "--experts", "128", "--top-k", "8", "--hidden", "2048"]
        + ["--ffn", "768", "--tokens", "8192", "--iters", "10"]
    )
    checks.append(Check("moe_grouped_vs_sequential_experts", experts, "stdout"))
    # tiny DeepSeek-V3 whole: MLA, group-limited sigmoid routing, one MTP module, grouped-GEMM experts
    mtp = ("model.mtp_num_layers=1", "model.moe.grouped_gemm=true")
    checks.append(_train("tiny_deepseek_mtp_grouped_experts", out, corpus, "tiny_deepseek", smoke, *mtp))
    checks += _tp_overlap_checks(out, corpus, smoke)
    memory = [
        py,
        "-m",
        "benchmarks.bench_memory",
        "--recipe",
        "llama_1b" if not smoke else "tiny_gpt",
        f"data.path={corpus}",
        "logging.wandb.mode=disabled",
    ]
    memory += ["train.device=cpu", "model.num_layers=2"] if smoke else ["train.global_batch_size=4"]
    checks.append(Check("memory_model_llama_1b", memory, "stdout"))
    return checks


def _tp_overlap_checks(out: pathlib.Path, corpus: str, smoke: bool) -> list[Check]:
    """llama_1b at tensor 2 with sequence parallelism on transformer-engine layers, without and with
    parallel.tp_comm_overlap (TE's userbuffers; planning/step_time.py:tp_overlap_exposed models it):
    two GPUs under torchrun, the step times side by side. Skipped where they cannot run."""
    skip = None
    if smoke:
        skip = "userbuffers need 2 GPUs and transformer-engine"
    elif importlib.util.find_spec("transformer_engine") is None:
        skip = "transformer-engine is not installed"
    else:
        import torch

        if torch.cuda.device_count() < 2:
            skip = f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"
    layout = ["model.transformer_impl=transformer_engine", "parallel.tensor=2", "parallel.sequence_parallel=true"]
    checks = []
    for name, extra in (("llama_1b_tp2_sp", []), ("llama_1b_tp2_tp_comm_overlap", ["parallel.tp_comm_overlap=true"])):
        check = _train(name, out, corpus, "llama_1b", smoke, *layout, *extra)
        # ordered TP/SP kernels, as scripts/slurm/launch.sh sets for every GPU run
        torchrun = ["env", "CUDA_DEVICE_MAX_CONNECTIONS=1", sys.executable, "-m", "torch.distributed.run"]
        check.command[:1] = [*torchrun, "--nproc_per_node=2"]
        check.skip = skip
        checks.append(check)
    return checks


def _run(check: Check, out: pathlib.Path) -> None:
    if check.skip:
        check.result = {"rc": 0, "wall_s": 0.0, "stdout": "", "skipped": check.skip}
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    log = out / f"{check.name}.log"
    start = time.perf_counter()
    proc = subprocess.run(check.command, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(check.command)}\n{proc.stdout}\n{proc.stderr}")
    check.result = {"rc": proc.returncode, "wall_s": time.perf_counter() - start, "stdout": proc.stdout}


def _summary(check: Check, peak: float, smoke: bool) -> str:
    if check.skip:
        return f"skipped: {check.skip}"
    if check.result["rc"] != 0:
        return f"FAILED (exit {check.result['rc']}, see {check.name}.log)"
    if check.read == "metrics":
        m = _read_metrics(check, peak, smoke)
        check.result.update(m)
        return f"step {m['step_s'] * 1e3:.0f} ms, {m['tokens_per_s']:.0f} tok/s, {m['tflops']:.1f} TFLOP/s, MFU {100 * m['mfu']:.1f}%"
    lines = [line for line in check.result["stdout"].splitlines() if line.strip()]
    if check.name.startswith("sdpa"):
        chosen = re.search(r"default dispatch runs (\S+)", check.result["stdout"])
        return chosen.group(1) if chosen else lines[-1]
    return lines[-1] if lines else "(no output)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part with tiny shapes on the CPU")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("OUT", "runs/gpu_check")))
    parser.add_argument("--only", nargs="*", help="run only the checks whose name starts with these")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = str(args.out / "corpus" / "text_document")
    subprocess.run(
        [sys.executable, "-m", "data.preprocess", "synthetic", "--output-prefix", corpus],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    peak = matmul_peak_tflops(args.smoke)
    checks = [c for c in _checks(args.out, corpus, args.smoke) if not args.only or c.name.startswith(tuple(args.only))]
    rows = [("matmul_peak", f"{peak:.1f} TFLOP/s ({'fp32 CPU' if args.smoke else 'bf16'})")]
    for check in checks:
        _run(check, args.out)
        rows.append((check.name, _summary(check, peak, args.smoke)))
        print(f"{check.name}: {rows[-1][1]} ({check.result['wall_s']:.0f} s)", flush=True)
    width = max(len(name) for name, _ in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    (args.out / "summary.json").write_text(
        json.dumps(
            {c.name: {k: v for k, v in c.result.items() if k != "stdout"} for c in checks}
            | {"matmul_peak_tflops": peak},
            indent=1,
        )
    )
    return 0 if all(c.result["rc"] == 0 for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())

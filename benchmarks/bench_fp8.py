"""What FP8 GEMMs cost or save against bf16, measured side by side (A B A B ...):

python -m benchmarks.bench_fp8 gemm [--shapes 4096x1024x2816 ...] [--iters 5]
    one linear's forward + backward (x: tokens × in, w: out × in), bf16 against the local FP8
    path (model/fp8/linear.py: tensorwise and rowwise, hybrid), in this process
python -m benchmarks.bench_fp8 train --recipe NAME [--nproc N] [--repeats 2] [overrides ...]
    whole training runs of pretrain_gpt.py (bf16, FP8 tensorwise, FP8 rowwise), each variant
    `--repeats` times in turn: median step time after the first steps, final loss
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import REPO

VARIANTS = {
    "bf16": ["train.precision=bf16"],
    "fp8 tensorwise": ["train.precision=bf16", "fp8.enabled=true", "fp8.recipe=tensorwise"],
    "fp8 rowwise": ["train.precision=bf16", "fp8.enabled=true", "fp8.recipe=rowwise"],
}


def _linear_step(recipe: Any, shape: tuple[int, ...], device: str) -> Callable[[], None]:
    """One forward + backward of a [tokens, in] x [out, in]ᵀ linear; recipe None = bf16 matmul."""
    import torch

    from model.config import Fp8Config
    from model.fp8.linear import Fp8LinearFunction, _Splits, gemms_for

    tokens, n_in, n_out = shape
    x = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n_out, n_in, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(tokens, n_out, device=device, dtype=torch.bfloat16)
    gemms = gemms_for(Fp8Config(enabled=True, recipe=recipe)) if recipe else None

    def step() -> None:
        y = x @ w.t() if gemms is None else Fp8LinearFunction.apply(x, w, None, gemms, _Splits.of(True, None, None))
        y.backward(dy)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def bench_gemm(shapes: list[str], iters: int, device: str) -> None:
    for text in shapes:
        shape = tuple(int(n) for n in text.split("x"))
        steps = {name: _linear_step(name.split()[-1] if name != "bf16" else None, shape, device) for name in VARIANTS}
        for step in steps.values():
            step()  # warm-up
        wall: dict[str, list[float]] = {name: [] for name in steps}
        cpu: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(iters):  # interleaved, so load on a shared machine hits every variant alike
            for name, step in steps.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                step()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.thread_time() - start_cpu)
        cells = []
        for name in steps:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            w0, c0 = statistics.median(wall["bf16"]), statistics.median(cpu["bf16"])
            cells.append(f"{name} wall {1000 * w:.1f} ms (x{w / w0:.2f}), cpu {1000 * c:.1f} ms (x{c / c0:.2f})")
        print(f"tokens x in x out = {text}: " + "; ".join(cells), flush=True)


def _run(recipe: str, nproc: int, overrides: list[str], log_dir: pathlib.Path) -> tuple[list[dict], float]:
    """One pretrain_gpt.py run: its metrics and the CPU seconds its processes used."""
    cmd = [sys.executable, "pretrain_gpt.py"]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "pretrain_gpt.py",
        ]
    args = ["--recipe", recipe, f"logging.dir={log_dir}", "logging.wandb.mode=disabled", "checkpoint.save=false"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd + args + overrides, cwd=REPO, check=True, env=dict(os.environ, WANDB_SILENT="true"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_dir / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    return metrics, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def bench_train(recipe: str, nproc: int, repeats: int, skip: int, steps: int, overrides: list[str]) -> None:
    """Each variant `repeats` times in turn, at `steps` steps and at `skip` steps (for CPU per step)."""
    wall: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    last: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, variant in VARIANTS.items():
                log_dir = pathlib.Path(tmp) / f"{name.replace(' ', '-')}-{r}"
                last[name], long_cpu = _run(recipe, nproc, [*variant, *overrides, f"train.steps={steps}"], log_dir)
                _, short_cpu = _run(recipe, nproc, [*variant, *overrides, f"train.steps={skip}"], log_dir / "short")
                wall[name].append(statistics.median(m["step_time_s"] for m in last[name][skip:]))
                cpu[name].append((long_cpu - short_cpu) / (steps - skip))
    base_wall, base_cpu = statistics.median(wall["bf16"]), statistics.median(cpu["bf16"])
    bf16_final = last["bf16"][-1]["loss"]
    for name in VARIANTS:
        w, c, metrics = statistics.median(wall[name]), statistics.median(cpu[name]), last[name]
        tail = statistics.mean(m["loss"] for m in metrics[-10:])
        gap = (metrics[-1]["loss"] - bf16_final) / bf16_final
        print(
            f"{name}: step wall {1000 * w:.0f} ms (x{w / base_wall:.2f}; runs {', '.join(f'{1000 * x:.0f}' for x in wall[name])}), "
            f"cpu {1000 * c:.0f} ms/step (x{c / base_cpu:.2f}; runs {', '.join(f'{1000 * x:.0f}' for x in cpu[name])}), "
            f"final loss {metrics[-1]['loss']:.4f} ({100 * gap:+.2f}% vs bf16), mean of last 10 {tail:.4f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    gemm = sub.add_parser("gemm")
    gemm.add_argument("--shapes", nargs="+", default=["256x64x176", "4096x1024x2816"])
    gemm.add_argument("--iters", type=int, default=5)
    gemm.add_argument("--device", default="cpu")
    train = sub.add_parser("train")
    train.add_argument("--recipe", required=True)
    train.add_argument("--nproc", type=int, default=1)
    train.add_argument("--repeats", type=int, default=2)
    train.add_argument("--steps", type=int, default=20)
    train.add_argument("--skip", type=int, default=3, help="first steps left out of the step time")
    train.add_argument("overrides", nargs="*")
    args = parser.parse_args()  # options first, then recipe overrides
    if args.what == "gemm":
        from upstream.process import prepare_process

        prepare_process()
        bench_gemm(args.shapes, args.iters, args.device)
    else:
        bench_train(args.recipe, args.nproc, args.repeats, args.skip, args.steps, args.overrides)


if __name__ == "__main__":
    main()

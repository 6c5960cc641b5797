"""The memory model's validation table: benchmarks/bench_memory.py over a fixed set of configurations
(dense and MoE; TP, SP, PP, VPP, CP (ring and Ulysses), EP, DP; distributed optimizer, FSDP zero2
and zero3; each recompute mode; fp32 and bf16; micro-batch 1 and 4; sequence 512 to 4096), one
markdown row per configuration (its worst rank by measured peak), then the largest and the mean
absolute error.

    python -m benchmarks.bench_memory_table                 # every configuration
    python -m benchmarks.bench_memory_table --only dense    # names containing "dense"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import REPO

# A model big enough that the modelled terms dominate fixed overheads, small enough for seconds on a CPU:
# 4 layers, hidden 512, SwiGLU 1408, 8 query heads on 2 K/V heads, byte vocabulary (384 padded).
BASE = [
    "model.num_layers=4",
    "model.hidden_size=512",
    "model.ffn_hidden_size=1408",
    "model.num_attention_heads=8",
    "model.num_query_groups=2",
    "model.seq_length=1024",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
]
MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.ffn_hidden_size=512"]
CAPACITY = ["model.moe.capacity_factor=1.0", "model.moe.pad_to_capacity=true"]  # every expert gets its capacity
SHARED = ["model.moe.shared_expert_ffn_hidden_size=1024"]
VPP2 = ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.precision=bf16", "train.global_batch_size=8"]
FULL = ["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"]


def selective(*modules: str) -> list[str]:
    return ["model.recompute_granularity=selective", f"model.recompute_modules=[{','.join(modules)}]"]


# name: (processes, recipe, overrides after BASE)
CONFIGS: dict[str, tuple[int, str, list[str]]] = {
    "dense fp32 mbs4 s512": (
        1,
        "tiny_gpt",
        ["train.micro_batch_size=4", "model.seq_length=512", "train.global_batch_size=8"],
    ),
    "dense bf16 s4096": (
        1,
        "tiny_gpt",
        [
            "train.precision=bf16",
            "model.seq_length=4096",
            "model.hidden_size=256",
            "model.ffn_hidden_size=704",
            "model.num_attention_heads=4",
        ],
    ),
    "dense bf16 full-uniform-1": (1, "tiny_gpt", ["train.precision=bf16", "model.seq_length=2048", *FULL]),
    "dense fp32 full-block-2": (
        1,
        "tiny_gpt",
        ["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=2"],
    ),
    "dense fp32 selective core_attn": (1, "tiny_gpt", selective("core_attn")),
    "dense fp32 selective layernorm": (1, "tiny_gpt", selective("layernorm")),
    "dense bf16 selective mlp": (1, "tiny_gpt", ["train.precision=bf16", *selective("mlp")]),
    "dense fp32 tp2": (2, "tiny_gpt", ["parallel.tensor=2"]),
    "dense bf16 tp2 sp": (
        2,
        "tiny_gpt",
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "train.precision=bf16", "model.seq_length=2048"],
    ),
    "dense fp32 pp2 mbs1": (2, "tiny_gpt", ["parallel.pipeline=2", "train.global_batch_size=8"]),
    # blocking and overlapped (overlap_p2p_comm: receives posted ahead, planning/schedule.py:overlap_held)
    "dense bf16 pp2 vpp2": (2, "tiny_gpt", [*VPP2, "parallel.overlap_p2p_comm=false"]),
    "dense bf16 pp2 vpp2 overlap_p2p": (2, "tiny_gpt", VPP2),
    "dense fp32 cp2 s2048": (2, "tiny_gpt", ["parallel.context=2", "model.seq_length=2048"]),
    "dense bf16 dp2 distopt": (2, "tiny_gpt", ["parallel.distributed_optimizer=true", "train.precision=bf16"]),
    # data 1 × context 2: the distributed optimizer shards over the context ranks too
    "dense bf16 cp2 distopt s2048": (
        2,
        "tiny_gpt",
        ["parallel.context=2", "parallel.distributed_optimizer=true", "train.precision=bf16", "model.seq_length=2048"],
    ),
    "dense fp32 cp2 a2a s2048": (
        2,
        "tiny_gpt",
        ["parallel.context=2", "parallel.context_comm=a2a", "model.seq_length=2048"],
    ),
    "dense fp32 dp2 fsdp zero3": (2, "tiny_gpt", ["parallel.fsdp=zero3"]),
    "dense bf16 dp2 fsdp zero2": (2, "tiny_gpt", ["parallel.fsdp=zero2", "train.precision=bf16"]),
    "moe fp32 ep1": (1, "tiny_moe", MOE),
    "moe fp32 selective moe": (1, "tiny_moe", [*MOE, *selective("moe")]),
    # megatron-core's moe checkpoint runs the shared experts inside it: they keep nothing either
    "moe bf16 shared selective moe s2048": (
        1,
        "tiny_moe",
        [*MOE, *SHARED, *selective("moe"), "train.precision=bf16", "model.seq_length=2048"],
    ),
    "moe bf16 ep2 capacity mbs4 s512": (
        2,
        "tiny_moe",
        [
            *MOE,
            *CAPACITY,
            "parallel.expert=2",
            "train.precision=bf16",
            "train.micro_batch_size=4",
            "model.seq_length=512",
            "train.global_batch_size=8",
        ],
    ),
    "moe bf16 tp2 sp ep2 capacity": (
        4,
        "tiny_moe",
        [
            *MOE,
            *CAPACITY,
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "parallel.expert=2",
            "train.precision=bf16",
        ],
    ),
}

# Dropless routing across expert-parallel ranks: each rank's expert tokens depend on where the router
# sends them. A freshly initialized router is far from balanced (attention gives every token a common
# component, so most pick the same experts: 1281, 242, 187 and 522 tokens on one rank's 4 experts where
# balance is 512 each), while the model assumes balanced routing (what the load-balancing loss trains
# towards). Shown apart from the bounds.
ROUTING_DEPENDENT: dict[str, tuple[int, str, list[str]]] = {
    "moe bf16 ep2 dropless mbs4 s512": (
        2,
        "tiny_moe",
        [
            *MOE,
            "parallel.expert=2",
            "train.precision=bf16",
            "train.micro_batch_size=4",
            "model.seq_length=512",
            "train.global_batch_size=8",
        ],
    ),
    "moe bf16 tp2 sp ep2 dropless": (
        4,
        "tiny_moe",
        [*MOE, "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2", "train.precision=bf16"],
    ),
}


def run(nproc: int, recipe: str, overrides: list[str]) -> list[dict]:
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    proc = subprocess.run(
        [*launcher, "-m", "benchmarks.bench_memory", "--recipe", recipe, *BASE, *overrides],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"{recipe} {overrides}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the configurations whose name contains this")
    args = parser.parse_args()
    errors = table(CONFIGS, args.only)
    if errors:
        print(
            f"\nlargest |error| over all ranks {100 * max(errors):.1f} %, mean {100 * sum(errors) / len(errors):.1f} %\n"
        )
    table(ROUTING_DEPENDENT, args.only)


def table(configs: dict[str, tuple[int, str, list[str]]], only: str) -> list[float]:
    """Runs each configuration; one row each (its worst rank by measured peak); every rank's |error|."""
    print("| configuration | ranks | worst rank | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|")
    errors = []
    for name, (nproc, recipe, overrides) in configs.items():
        if only not in name:
            continue
        lines = run(nproc, recipe, overrides)
        worst = max(lines, key=lambda line: line["measured_mib"])
        errors += [abs(line["error"]) for line in lines]
        print(
            f"| {name} | {nproc} | {worst['rank']} | {worst['predicted_mib']:.1f} | {worst['measured_mib']:.1f} "
            f"| {100 * worst['error']:+.1f} % |",
            flush=True,
        )
        print(json.dumps({"name": name, "ranks": lines}), file=sys.stderr, flush=True)
    return errors


if __name__ == "__main__":
    main()

"""Benchmark: time to build one training step's samples in the training process.

    python -m benchmarks.bench_data --prefix runs/quickstart/corpus/text_document --seq 8192 --samples 16

This is the work `data.num_workers` moves into DataLoader processes: megatron-core's GPTDataset
lookups, the read from the memory-mapped .bin and the tensors of `--samples` micro-batches of one
sample each. Prints the median over `--steps` steps after a first one (index building, page cache).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", required=True, help="indexed dataset prefix (PREFIX.bin / .idx / .json)")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=16, help="samples per step (micro-batches of one)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tokenizer", default="byte", help="the corpus's tokenizer (data.tokenizer): its EOD and size")
    args = parser.parse_args()

    import torch.distributed as dist

    from data.dataset import build_samples
    from data.loader import BatchPlan
    from data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the builder's barrier
    samples = build_samples(
        [(1.0, args.prefix)],
        [],
        "100,0,0",
        args.seq,
        1234,
        tokenizer.eod,
        False,
        tempfile.mkdtemp(),
        tokenizer.vocab_size,
    )["train"]
    share = BatchPlan(global_batch_size=args.samples, micro_batch_size=1)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        for m in range(share.micro_batches):
            share.batch(samples, step * args.samples, m)
        times.append(time.perf_counter() - start)
    median = statistics.median(times[1:])
    print(
        f"seq {args.seq}, {args.samples} samples per step: median {median * 1e3:.2f} ms per step, "
        f"{median / args.samples * 1e3:.3f} ms per sample"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Benchmark: what `python -m tools.inspect_data` costs on a large corpus, before and after the run's data
cache exists.

    python -m benchmarks.bench_inspect --tokens 2e9 --step 100000 [--dir /tmp/bench_inspect]

Writes a corpus of `--tokens` random byte-vocabulary tokens in documents of 1 to 2000 tokens (once;
kept in `--dir`), then times the command for `--step` of tiny_gpt at seq_length 4096: first with an
empty data cache (megatron-core builds and caches its document, sample and shuffle indices, as the
trainer's first start does), then again with the cache in place (what inspecting a run that
trained costs). Both times are of the whole process, megatron-core's import included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from benchmarks.common import REPO

CHUNK = 50_000_000  # tokens written per builder call


def write_corpus(prefix: str, tokens: int) -> None:
    import numpy

    from data.preprocess import _indexed_dataset_builder

    rng = numpy.random.default_rng(0)
    builder = _indexed_dataset_builder()(prefix + ".bin", dtype=numpy.uint16)
    written = 0
    while written < tokens:
        lengths = rng.integers(1, 2001, size=CHUNK // 1000)
        lengths = lengths[: int(numpy.searchsorted(numpy.cumsum(lengths), min(CHUNK, tokens - written)))]
        if lengths.size == 0:
            break
        ids = rng.integers(0, 256, size=int(lengths.sum()), dtype=numpy.uint16)
        ids[numpy.cumsum(lengths) - 1] = 256  # each document ends with the EOD
        builder.add_document(ids, lengths.tolist())
        written += int(lengths.sum())
    builder.finalize(prefix + ".idx")


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tools.inspect_data", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=2e9)
    parser.add_argument("--step", type=int, default=100_000)
    parser.add_argument("--dir", default="/tmp/bench_inspect")
    args = parser.parse_args()
    prefix = os.path.join(args.dir, f"corpus_{int(args.tokens)}", "text_document")
    if not os.path.isfile(prefix + ".idx"):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        start = time.perf_counter()
        write_corpus(prefix, int(args.tokens))
        print(
            f"wrote {prefix}.bin ({os.path.getsize(prefix + '.bin') / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s"
        )
    cache = os.path.join(args.dir, "data_cache")
    shutil.rmtree(cache, ignore_errors=True)
    command = [
        "--recipe",
        "tiny_gpt",
        f"data.path={prefix}",
        f"data.cache_dir={cache}",
        "model.seq_length=4096",
        f"logging.dir={args.dir}/run",
        "--step",
        str(args.step),
        "--micro-batch",
        "0",
    ]
    cold = timed(command)
    warm = timed(command)
    print(f"inspect step {args.step}: {cold:.1f} s with an empty data cache, {warm:.1f} s with the cache in place")


if __name__ == "__main__":
    main()

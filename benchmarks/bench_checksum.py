"""What checkpoint checksums cost (pretrain/checkpoint/manifest.py): one process saves N GiB of fp32 tensors with
megatron-core dist_checkpointing, then times, per GiB, the save, the manifest (sizes and CRC32 of
every file, as pretrain/checkpoint/storage.py:save records them), the check before a load with and without
CRC32s (checkpoint.verify), and the load itself.

    python -m benchmarks.bench_checksum [--gib 1.0] [--dir /tmp/bench_checksum]

The files are read back from the page cache (just written): the CRC32 cost, not the disk's.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time
from collections.abc import Callable


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB")
    parser.add_argument("--dir", default="/tmp/bench_checksum", help="where to write it (removed after)")
    args = parser.parse_args(argv)

    from upstream.process import prepare_process

    prepare_process()
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from parallel.layout import init_single_process, shutdown
    from pretrain.checkpoint import manifest

    init_single_process()
    root = pathlib.Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    path = root / "iter_0000001"
    path.mkdir(parents=True)
    numel = 64 << 20  # 256 MiB tensors
    count = max(1, round(args.gib * (1 << 30) / (numel * 4)))
    tensors = [torch.randn(numel) for _ in range(count)]
    state = {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", t) for i, t in enumerate(tensors)}
    gib = count * numel * 4 / (1 << 30)
    save = _timed(lambda: dist_checkpointing.save(state, str(path)))

    def record() -> None:
        manifest.record_rank_files(path, dist.get_rank())
        manifest.write_manifest(path)

    rows = {
        "save (dist_checkpointing.save)": save,
        "manifest at save (sizes + CRC32)": _timed(record),
        "check before load, verify false (sizes)": _timed(lambda: manifest.problems(path, verify=False)),
        "check before load, verify true (CRC32)": _timed(lambda: manifest.problems(path, verify=True)),
    }
    template = {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.empty(numel)) for i in range(count)}
    rows["load (dist_checkpointing.load)"] = _timed(lambda: dist_checkpointing.load(template, str(path)))
    print(f"checkpoint of {gib:.2f} GiB ({count} tensors), one process")
    for name, seconds in rows.items():
        print(f"  {name:42s} {seconds / gib:6.3f} s/GiB  ({seconds / save:5.1%} of the save)")
    shutil.rmtree(root, ignore_errors=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

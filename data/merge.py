"""Join .bin/.idx pairs, in the order given, into one (the shards of `data.preprocess text --shard`)."""

import argparse
import os
import re
import sys
import time

import numpy

from common.errors import UserError, run_tool

SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})$")  # data.preprocess's PREFIX-0000I-of-0000N


def check_shards(prefixes: list[str]) -> None:
    """Prefixes named as shards must be all N of them, in order: a missing or misplaced shard would
    silently drop or reorder documents."""
    named = [SHARD_NAME.search(prefix) for prefix in prefixes]
    if not any(named):
        return
    counts = {int(match.group(2)) for match in named if match}
    if len(counts) != 1 or not all(named):
        raise UserError("give the shards of one run only: their names must all end in -0000I-of-0000N, one N")
    count = counts.pop()
    indices = [int(match.group(1)) for match in named if match]
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        what = f"shard(s) {', '.join(map(str, missing))} missing" if missing else f"given in the order {indices}"
        raise UserError(f"the {count} shards must be given in order 0..{count - 1}: {what}")


def merge(prefixes: list[str], output_prefix: str, overwrite: bool = False) -> dict:
    """OUTPUT.bin/.idx with the documents of every prefix, in order, by megatron-core's builder
    (written under temporary names, then renamed)."""
    from upstream.process import prepare_process

    prepare_process()
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    check_shards(prefixes)
    for prefix in prefixes:
        for ending in (".bin", ".idx"):
            if not os.path.isfile(prefix + ending):
                raise UserError(f"'{prefix}{ending}' not found: give the prefixes of finished .bin/.idx pairs")
        if os.path.abspath(prefix) == os.path.abspath(output_prefix):
            raise UserError(f"--output-prefix {output_prefix} is also an input")
    if not overwrite and (os.path.exists(output_prefix + ".bin") or os.path.exists(output_prefix + ".idx")):
        raise UserError(f"{output_prefix}.bin/.idx already exist: pass --overwrite to replace them")
    # a shard that owned no rows is an empty pair (megatron-core cannot map an empty .bin): it adds nothing
    prefixes = [prefix for prefix in prefixes if os.path.getsize(prefix + ".bin")] or prefixes[:1]
    dtypes = {prefix: _dtype(prefix, IndexedDataset) for prefix in prefixes}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{prefix}: {numpy_name(dtype)}" for prefix, dtype in dtypes.items())
        raise UserError(f"the inputs hold tokens of different types ({listed}): made with different tokenizers")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(output_prefix + ".tmp.bin", dtype=dtypes[prefixes[0]])
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(output_prefix + ".tmp.idx")
    os.replace(output_prefix + ".tmp.bin", output_prefix + ".bin")
    os.replace(output_prefix + ".tmp.idx", output_prefix + ".idx")
    documents = len(builder.document_indices) - 1
    return {"documents": documents, "tokens": int(sum(builder.sequence_lengths))}


def _dtype(prefix: str, IndexedDataset: type) -> type:
    if not os.path.getsize(prefix + ".bin"):
        return numpy.uint16  # every input is empty: the output is too, of the narrow type
    return IndexedDataset(prefix).index.dtype


def numpy_name(dtype: type) -> str:
    return getattr(dtype, "__name__", str(dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.merge", description=__doc__)
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX", help="the .bin/.idx pairs to join, in order")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = parser.parse_args(argv)

    def body() -> int:
        start = time.perf_counter()
        stats = merge(args.prefixes, args.output_prefix, args.overwrite)
        print(
            f"wrote {args.output_prefix}.bin/.idx from {len(args.prefixes)} inputs: {stats['documents']} "
            f"documents, {stats['tokens']} tokens, {time.perf_counter() - start:.1f} s"
        )
        return 0

    return run_tool(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

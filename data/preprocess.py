"""Turn documents (stdlib source, synthetic motifs, the user's files or a hub dataset) into indexed .bin/.idx files."""

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy

from common.errors import EXIT_USER_ERROR, UserError, path_problem
from data.inputs import Source, find_sources, fingerprint, part_texts, plan_parts, shard_window
from data.parts import (
    PLAN_FORMAT,
    Progress,
    WorkerSetup,
    _indexed_dataset_builder,
    finalize,
    open_parts,
    part_record,
    run_parts,
)
from data.sources import BYTE_VOCAB_SIZE, QUICKSTART_MAX_BYTES, quickstart_documents, synthetic_documents
from data.streams import iter_plan
from data.tokenizer import ByteTokenizer, build_tokenizer


def token_dtype(vocab_size: int) -> type:
    """uint16 halves the file size when every id fits; 65500 is megatron-core's own cut-off."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def write_indexed(docs: Iterable[list[int]], prefix: str, vocab_size: int, eod: int | None = None) -> dict:
    """Write PREFIX.bin/.idx, one sequence per document with `eod` appended; return the counts.

    `eod` defaults to vocab_size - 1, the byte tokenizer's EOD; pass the tokenizer's own otherwise.
    """
    import torch

    IndexedDatasetBuilder = _indexed_dataset_builder()
    eod = vocab_size - 1 if eod is None else eod
    dtype = token_dtype(vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    documents = tokens = 0
    for doc in docs:
        ids = _with_eod(doc, eod, vocab_size, prefix)
        builder.add_item(torch.from_numpy(ids))
        builder.end_document()
        documents += 1
        tokens += ids.size
    builder.finalize(prefix + ".idx")
    return {"documents": documents, "tokens": tokens}


def _with_eod(doc: list[int], eod: int, vocab_size: int, prefix: str) -> numpy.ndarray:
    """The document as int64 ids followed by EOD, checked to fit the vocabulary (uint16 would wrap)."""
    ids = numpy.empty(len(doc) + 1, dtype=numpy.int64)
    ids[:-1] = doc
    ids[-1] = eod
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{prefix}: token id outside [0, {vocab_size}) in document; tokenizer bug")
    return ids


# ---- quickstart: Python's own standard library as text -------------------------------------------


def _read_stamp(prefix: str) -> dict | None:
    try:
        with open(prefix + ".json") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _quickstart_is_current(prefix: str, max_bytes: int) -> dict | None:
    """The stamp when PREFIX.bin/.idx were written for this max_bytes and still hold what it says."""
    stamp = _read_stamp(prefix)
    if not stamp or stamp.get("max_bytes") != max_bytes:
        return None
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    if not (os.path.isfile(bin_path) and os.path.isfile(idx_path)):
        return None
    # Size check catches a .bin truncated by an interrupted earlier run.
    expected_size = stamp.get("tokens", -1) * numpy.dtype(token_dtype(BYTE_VOCAB_SIZE)).itemsize
    return stamp if os.path.getsize(bin_path) == expected_size else None


def build_quickstart_corpus(prefix: str, max_bytes: int = QUICKSTART_MAX_BYTES) -> dict:
    """Byte-tokenize the stdlib source into PREFIX.bin/.idx, or keep the files if already built."""
    stamp = _quickstart_is_current(prefix, max_bytes)
    if stamp is not None:
        return {**stamp, "skipped": True}
    if os.path.exists(prefix + ".json"):
        os.remove(prefix + ".json")  # the stamp is written last, so it never vouches for partial files
    tokenizer = ByteTokenizer()
    docs = (tokenizer.tokenize(text) for text in quickstart_documents(max_bytes))
    stats = write_indexed(docs, prefix, tokenizer.vocab_size, tokenizer.eod)
    stamp = {**stats, "max_bytes": max_bytes}
    with open(prefix + ".json", "w") as file:
        json.dump(stamp, file)
    return {**stamp, "skipped": False}


# ---- synthetic: learnable, machine-independent token streams -------------------------------------


def build_synthetic_corpus(
    prefix: str, num_docs: int = 2000, seed: int = 0, lengths: tuple[int, int] = (20, 300)
) -> dict:
    """Write `num_docs` synthetic documents of `lengths` tokens (byte vocabulary) to PREFIX.bin/.idx."""
    tokenizer = ByteTokenizer()
    docs = synthetic_documents(num_docs, seed, tokenizer.vocab_size, lengths)
    return write_indexed(docs, prefix, tokenizer.vocab_size, tokenizer.eod)


# ---- text: the user's files or a hub dataset, read through HF datasets, streamed -----------------

# ---- text: the user's files or a hub dataset, cut into parts, tokenized by worker processes ------

EOD_TOKEN = "<|endoftext|>"  # the EOD of a tokenizer trained here (data.tokenizer finds it by name)
PARTS_AIMED = 64  # parts per run (or shard) when --part-bytes is not given: resume loses at most one
PART_BYTES_MIN, PART_BYTES_MAX = 1 << 20, 16 << 20  # ...within these bounds


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: str) -> str:
    """Train a byte-level BPE tokenizer (HF tokenizers) on `texts`; save it as `path`, return `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
    )
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tokenizer.save(path)
    return path


def shard_prefix(prefix: str, shard: tuple[int, int]) -> str:
    """Where shard I of N writes: PREFIX-0000I-of-0000N (zero-padded, so a glob sorts the shards)."""
    index, count = shard
    return prefix if count == 1 else f"{prefix}-{index:05d}-of-{count:05d}"


def build_text_corpus(
    patterns: list[str],
    prefix: str,
    tokenizer_name: str = "byte",
    text_key: str = "text",
    workers: int = 1,
    train_vocab_size: int | None = None,
    hub: tuple | None = None,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    part_bytes: int | None = None,
    split: str = "train",
) -> dict:
    """Tokenize the input documents (files, saved datasets and/or one hub dataset) of shard I of N
    into PREFIX.bin/.idx (PREFIX-I-of-N when N > 1), resuming the parts a killed run finished.

    With `train_vocab_size`, first train a BPE tokenizer of that size on the same documents and
    save it as tokenizer.json beside the output; its path is returned under 'tokenizer'.
    """
    sources = find_sources(patterns, hub, split)
    if shard[1] > 1 and any(source.kind == "hub" for source in sources):
        raise UserError("--shard splits files: save the hub dataset to disk (save_to_disk) and give that folder")
    out = shard_prefix(prefix, shard)
    stats: dict[str, Any] = {"output": out}
    if train_vocab_size is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(prefix)), "tokenizer.json")
        if not (os.path.isdir(out + ".parts") and os.path.isfile(path)):  # a resumed run keeps its tokenizer
            train_bpe_tokenizer(_all_texts(sources, text_key), train_vocab_size, path)
        tokenizer_name = stats["tokenizer"] = path
    tokenizer = build_tokenizer(tokenizer_name)
    if tokenizer.vocab_size > numpy.iinfo(numpy.int32).max:
        raise UserError(
            f"tokenizer '{tokenizer_name}' has {tokenizer.vocab_size} ids, more than int32 token files can hold"
        )
    dtype = numpy.dtype(token_dtype(tokenizer.vocab_size)).name
    lo, hi = shard_window(sources, shard)
    part_bytes = part_bytes or min(max((hi - lo) // PARTS_AIMED, PART_BYTES_MIN), PART_BYTES_MAX)
    plan = {
        "format": PLAN_FORMAT,
        "inputs": fingerprint(sources),
        "text_key": text_key,
        "tokenizer": tokenizer.fingerprint(),
        "shard": list(shard),
        "part_bytes": part_bytes,
        "dtype": dtype,
    }
    done = open_parts(out, plan, overwrite)
    resumed = len(done)
    try:
        parts = plan_parts(sources, shard, part_bytes)
        total = sum(item.weight for item in parts)
        setup = WorkerSetup(tokenizer, tokenizer_name, text_key, out + ".parts", dtype)
        meter = Progress(total, progress)
        names = run_parts(iter_plan(parts, text_key, part_bytes), done, setup, workers, meter)
        meter.close()
        counts = {key: sum(done[name][key] for name in names) for key in ("documents", "tokens", "empty", "blank")}
        if counts["documents"] == 0 and shard[1] == 1:
            raise UserError("the input holds no documents: nothing to write")
        records = {name: part_record(out + ".parts", name, done[name]) for name in names}
        finalize(out, names, records, dtype)
    except UserError:
        shutil.rmtree(out + ".parts", ignore_errors=True)  # bad input: its parts are of no use
        raise
    return {**stats, **counts, "parts": len(names), "resumed_parts": resumed}


def _all_texts(sources: list[Source], text_key: str) -> Iterator[str]:
    """Every document of the inputs, read in this process (to train a tokenizer on)."""
    for item in iter_plan(plan_parts(sources, (0, 1), PART_BYTES_MAX), text_key, PART_BYTES_MAX):
        yield from part_texts(item, text_key)[0]


# ---- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.preprocess", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    quickstart = commands.add_parser("quickstart", help="Python's stdlib source, byte-tokenized")
    quickstart.add_argument("--output-prefix", required=True)
    quickstart.add_argument("--max-bytes", type=int, default=QUICKSTART_MAX_BYTES)
    synthetic = commands.add_parser("synthetic", help="learnable random documents, same on every machine")
    synthetic.add_argument("--output-prefix", required=True)
    synthetic.add_argument("--num-docs", type=int, default=2000)
    synthetic.add_argument("--seed", type=int, default=0)
    text = commands.add_parser(
        "text", help="your files (jsonl[.gz/.zst], parquet, json, arrow, text), saved datasets or a hub dataset"
    )
    text.add_argument(
        "--input",
        nargs="+",
        action="extend",  # --input a --input b reads both, in that order
        default=[],
        help="files, globs or folders (the option may be repeated): the rows of .jsonl, .jsonl.gz, "
        ".jsonl.zst, .parquet, .json and .arrow files and of folders saved by datasets' save_to_disk "
        "are documents, any other file is one plain-text document",
    )
    text.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face hub dataset (downloaded; streamed)")
    text.add_argument("--hf-subset", metavar="NAME", help="the hub dataset's configuration")
    text.add_argument("--hf-split", default="train", help="the split of the hub dataset or of a saved DatasetDict")
    text.add_argument("--output-prefix", required=True)
    text.add_argument(
        "--tokenizer", default="byte", help="'byte', a local tokenizer.json (or its folder), or a hub tokenizer name"
    )
    text.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB_SIZE",
        help="first train a byte-level BPE of this size on the input; saved as tokenizer.json "
        "beside the output and used",
    )
    text.add_argument("--text-key", default="text", help="the field holding the text (json/parquet/arrow)")
    text.add_argument("--workers", type=int, default=1, help="tokenizer processes (one per core is fastest)")
    text.add_argument(
        "--shard",
        metavar="I/N",
        help="process the I-th of N shares of the input rows (0 <= I < N) into PREFIX-0000I-of-0000N; "
        "join them with python -m data.merge (default: from SLURM_ARRAY_TASK_ID and _COUNT in a "
        "Slurm array job, else 0/1)",
    )
    text.add_argument("--overwrite", action="store_true", help="replace a finished output, or another run's parts")
    text.add_argument(
        "--part-bytes",
        type=int,
        metavar="BYTES",
        help="input bytes per part, the unit of work and of resume (default: a 64th of the input, within 1-16 MiB)",
    )
    text.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser


def parse_shard(text: str | None, environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """--shard I/N, else the Slurm array task's place among its array (ids need not start at 0)."""
    where = "--shard"
    if text is None:
        if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
            return 0, 1
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        text = f"{int(environ['SLURM_ARRAY_TASK_ID']) - first}/{environ['SLURM_ARRAY_TASK_COUNT']}"
        where = "the Slurm array task (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN / SLURM_ARRAY_TASK_COUNT)"
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise UserError(f"{where} {text}: expected I/N with 0 <= I < N, e.g. 3/8")
    return int(index), int(count)


def _run(args: argparse.Namespace) -> dict:
    if args.command == "quickstart":
        return build_quickstart_corpus(args.output_prefix, args.max_bytes)
    if args.command == "synthetic":
        return build_synthetic_corpus(args.output_prefix, args.num_docs, args.seed)
    if not args.input and args.hf_dataset is None:
        raise UserError("give --input files or --hf-dataset NAME")
    if args.hf_subset is not None and args.hf_dataset is None:
        raise UserError(f"--hf-subset {args.hf_subset} is a configuration of a hub dataset: give --hf-dataset NAME")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.part_bytes is not None and args.part_bytes < 1:
        raise UserError(f"--part-bytes must be at least 1, got {args.part_bytes}")
    if args.train_tokenizer is not None and args.tokenizer != "byte":
        raise UserError("--train-tokenizer trains the tokenizer to use: leave out --tokenizer")
    if args.train_tokenizer is not None and args.train_tokenizer < BYTE_VOCAB_SIZE:
        raise UserError(
            f"--train-tokenizer {args.train_tokenizer}: a byte-level BPE needs at least "
            f"{BYTE_VOCAB_SIZE} ids (256 bytes and the EOD)"
        )
    shard = parse_shard(args.shard)
    if args.train_tokenizer is not None and shard[1] > 1:
        raise UserError("--train-tokenizer with shards would train one tokenizer per shard: train it first")
    hub = (args.hf_dataset, args.hf_subset, args.hf_split) if args.hf_dataset else None
    return build_text_corpus(
        args.input,
        args.output_prefix,
        args.tokenizer,
        args.text_key,
        args.workers,
        args.train_tokenizer,
        hub,
        progress=not args.no_progress,
        shard=shard,
        overwrite=args.overwrite,
        part_bytes=args.part_bytes,
        split=args.hf_split,
    )


def _summary(stats: dict, seconds: float) -> str:
    trained = f" (tokenizer {stats['tokenizer']})" if "tokenizer" in stats else ""
    line = (
        f"wrote {stats['output']}.bin/.idx{trained}: {stats['documents']} documents, {stats['tokens']} tokens, "
        f"{seconds:.1f} s, {stats['tokens'] / max(seconds, 1e-9):.0f} tokens/s"
    )
    skipped = [
        f"{stats[key]} {what}" for key, what in (("empty", "empty (no tokens)"), ("blank", "blank lines")) if stats[key]
    ]
    if skipped:
        line += f"; left out: {', '.join(skipped)}"
    if stats["resumed_parts"]:
        line += f"; resumed: {stats['resumed_parts']} of {stats['parts']} parts were done before"
    return line


def main(argv: list[str] | None = None) -> int:
    """Build one corpus and print a one-line summary; bad input → one line on stderr, exit 2."""
    from upstream.process import prepare_process  # torch: not for the tokenizer processes

    args = _parser().parse_args(argv)
    prepare_process()
    start = time.perf_counter()
    try:
        stats = _run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        if path_problem(error) is None:
            raise
        print(f"error: {path_problem(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.command != "text":
        summary = f"{args.output_prefix}.bin/.idx: {stats['documents']} documents, {stats['tokens']} tokens"
        if stats.get("skipped"):
            print(f"kept up-to-date {summary} (built earlier from the same sources)")
            return 0
        seconds = time.perf_counter() - start
        print(f"wrote {summary}, {seconds:.1f} s, {stats['tokens'] / max(seconds, 1e-9):.0f} tokens/s")
        return 0
    print(_summary(stats, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    from upstream.process import exit_quickly

    exit_quickly(main())

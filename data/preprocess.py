"""Turn documents (stdlib source, synthetic motifs, the user's files or a hub dataset) into indexed .bin/.idx files."""

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy

from common.errors import EXIT_USER_ERROR, UserError, path_problem
from data.sources import (
    BYTE_VOCAB_SIZE,
    QUICKSTART_MAX_BYTES,
    expand_inputs,
    input_streams,
    quickstart_documents,
    synthetic_documents,
    text_documents,
)
from data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from upstream.process import exit_quickly, prepare_process


def token_dtype(vocab_size: int) -> type:
    """uint16 halves the file size when every id fits; 65500 is megatron-core's own cut-off."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def _indexed_dataset_builder():
    """megatron-core's IndexedDatasetBuilder; on a CPU-only machine megatron-core is first imported
    with its JIT fuser off (upstream/process.py), which takes most of the import time off a corpus
    build."""
    from upstream.process import import_megatron_without_jit_fusers

    import_megatron_without_jit_fusers()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return IndexedDatasetBuilder


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

# HF datasets builder per file ending; any other file is plain text, one document per file.
BATCH_DOCUMENTS = 256  # documents per tokenization task at most,
BATCH_CHARACTERS = 256 * 1024  # and about this much text, so that long documents still spread over workers
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: bounds memory however large the input is
EOD_TOKEN = "<|endoftext|>"  # the EOD of a tokenizer trained here (data.tokenizer finds it by name)


def _batches(texts: Iterable[str], size: int, characters: int = BATCH_CHARACTERS) -> Iterator[list[str]]:
    batch, held = [], 0
    for text in texts:
        batch.append(text)
        held += len(text)
        if len(batch) == size or held >= characters:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


# Each pool worker receives the parent's tokenizer once (initializer; pickled, a HF tokenizer as its
# JSON) and keeps it for its tasks: no worker reads a file or asks the hub again.
_WORKER_TOKENIZER: ByteTokenizer | HFTokenizer | None = None


def _init_worker(tokenizer: ByteTokenizer | HFTokenizer) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _WORKER_TOKENIZER = tokenizer


def _tokenize_batch(
    texts: list[str],
    tokenizer: ByteTokenizer | HFTokenizer | None = None,
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(all ids of the batch with an EOD after each document, int64; per-document lengths).

    Documents without a single token are left out, as Megatron-LM's preprocess_data.py does: a
    lone EOD would only teach the model to follow EOD with EOD."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    assert tokenizer is not None, "a pool worker's tokenizer comes from _init_worker"
    docs = [d for d in tokenizer.tokenize_batch(texts) if len(d)]
    lengths = numpy.fromiter((len(d) + 1 for d in docs), dtype=numpy.int64, count=len(docs))
    flat = numpy.empty(int(lengths.sum()), dtype=numpy.int64)
    ends = numpy.cumsum(lengths)
    flat[ends - 1] = tokenizer.eod
    for doc, end in zip(docs, ends):
        flat[end - 1 - len(doc) : end - 1] = doc
    return flat, lengths


def tokenized_batches(
    texts: Iterable[str],
    tokenizer_name: str,
    workers: int,
    batch_size: int = BATCH_DOCUMENTS,
    tokenizer: ByteTokenizer | HFTokenizer | None = None,
) -> Iterator[tuple[numpy.ndarray, numpy.ndarray]]:
    """Tokenized batches in input order; with workers > 1 a process pool, at most a few batches ahead.
    `tokenizer`, when given, is the one already built from `tokenizer_name` (a hub name is fetched
    once); the pool's processes get a copy of it."""
    batches = _batches(texts, batch_size)
    tokenizer = tokenizer or build_tokenizer(tokenizer_name)
    if workers <= 1:
        yield from (_tokenize_batch(batch, tokenizer) for batch in batches)
        return
    # spawn, not fork: the parent may already run tokenizer threads (training a BPE) or hold locks
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_tokenize_batch, (batch,)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_batches(
    batches: Iterable[tuple[numpy.ndarray, numpy.ndarray]],
    prefix: str,
    vocab_size: int,
    tokenizer_name: str,
    progress: bool = True,
) -> dict:
    """Stream batches into PREFIX.bin/.idx, written under temporary names and renamed when complete:
    an error or interruption leaves no partial files behind."""
    IndexedDatasetBuilder = _indexed_dataset_builder()
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = prefix + ".tmp"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=token_dtype(vocab_size))
    try:
        stats = _add_batches(builder, batches, vocab_size, tokenizer_name, progress)
        builder.finalize(tmp + ".idx")
        if stats["documents"] == 0:
            raise UserError("the input holds no documents: nothing to write")
    except BaseException:
        builder.data_file.close()
        for ending in (".bin", ".idx"):
            if os.path.exists(tmp + ending):
                os.remove(tmp + ending)
        raise
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return stats


def _add_batches(
    builder: Any,
    batches: Iterable[tuple[numpy.ndarray, numpy.ndarray]],
    vocab_size: int,
    tokenizer_name: str,
    progress: bool,
) -> dict:
    documents = tokens = 0
    with _progress_bar(progress) as bar:
        for flat, lengths in batches:
            if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
                raise UserError(
                    f"tokenizer '{tokenizer_name}' produced id {int(flat.max())} outside its "
                    f"vocabulary of {vocab_size} ids"
                )
            start = 0
            for length in lengths.tolist():
                builder.add_document(flat[start : start + length], [length])
                start += length
            documents += lengths.size
            tokens += flat.size
            bar.update(int(lengths.size))
            bar.set_postfix(tokens=tokens, refresh=False)
    return {"documents": documents, "tokens": tokens}


def _progress_bar(enabled: bool) -> Any:
    from tqdm import tqdm

    # disable=None: shown on a terminal only, so logs and captured stderr keep one-line errors
    return tqdm(unit=" docs", file=sys.stderr, disable=None if enabled else True, mininterval=0.5)


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


def build_text_corpus(
    patterns: list[str],
    prefix: str,
    tokenizer_name: str = "byte",
    text_key: str = "text",
    workers: int = 1,
    train_vocab_size: int | None = None,
    hub: tuple | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize the input documents (files and/or one hub dataset) and write PREFIX.bin/.idx.

    With `train_vocab_size`, first train a BPE tokenizer of that size on the same documents and
    save it as tokenizer.json beside the output; its path is returned under 'tokenizer'.
    """
    paths = expand_inputs(patterns)
    hub_name, hub_subset, hub_split = hub or (None, None, "train")

    def documents() -> Iterator[str]:  # a fresh stream per pass: nothing held in memory
        return text_documents(input_streams(paths, hub_name, hub_subset, hub_split), text_key)

    stats = {}
    if train_vocab_size is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(prefix)), "tokenizer.json")
        tokenizer_name = stats["tokenizer"] = train_bpe_tokenizer(documents(), train_vocab_size, path)
    tokenizer = build_tokenizer(tokenizer_name)
    if tokenizer.vocab_size > numpy.iinfo(numpy.int32).max:
        raise UserError(
            f"tokenizer '{tokenizer_name}' has {tokenizer.vocab_size} ids, more than int32 token files can hold"
        )
    batches = tokenized_batches(documents(), tokenizer_name, workers, tokenizer=tokenizer)
    return {**stats, **write_batches(batches, prefix, tokenizer.vocab_size, tokenizer_name, progress)}


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
    text = commands.add_parser("text", help="your files (jsonl/json/parquet/arrow/text) or a hub dataset")
    text.add_argument(
        "--input",
        nargs="+",
        action="extend",  # --input a --input b reads both, in that order
        default=[],
        help="files or globs (the option may be repeated); .jsonl/.json/.parquet/.arrow "
        "rows are documents, any other file is one plain-text document",
    )
    text.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face hub dataset (downloaded; streamed)")
    text.add_argument("--hf-subset", metavar="NAME", help="the hub dataset's configuration")
    text.add_argument("--hf-split", default="train", help="the hub dataset's split")
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
    text.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    return parser


def _run(args: argparse.Namespace) -> dict:
    if args.command == "quickstart":
        return build_quickstart_corpus(args.output_prefix, args.max_bytes)
    if args.command == "synthetic":
        return build_synthetic_corpus(args.output_prefix, args.num_docs, args.seed)
    if not args.input and args.hf_dataset is None:
        raise UserError("give --input files or --hf-dataset NAME")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.train_tokenizer is not None and args.tokenizer != "byte":
        raise UserError("--train-tokenizer trains the tokenizer to use: leave out --tokenizer")
    if args.train_tokenizer is not None and args.train_tokenizer < BYTE_VOCAB_SIZE:
        raise UserError(
            f"--train-tokenizer {args.train_tokenizer}: a byte-level BPE needs at least "
            f"{BYTE_VOCAB_SIZE} ids (256 bytes and the EOD)"
        )
    hub = (args.hf_dataset, args.hf_subset, args.hf_split) if args.hf_dataset else None
    return build_text_corpus(
        args.input, args.output_prefix, args.tokenizer, args.text_key, args.workers, args.train_tokenizer, hub
    )


def main(argv: list[str] | None = None) -> int:
    """Build one corpus and print a one-line summary; bad input → one line on stderr, exit 2."""
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
    trained = f" (tokenizer {stats['tokenizer']})" if "tokenizer" in stats else ""
    summary = f"{args.output_prefix}.bin/.idx{trained}: {stats['documents']} documents, {stats['tokens']} tokens"
    if stats.get("skipped"):
        print(f"kept up-to-date {summary} (built earlier from the same sources)")
        return 0
    seconds = time.perf_counter() - start
    print(f"wrote {summary}, {seconds:.1f} s, {stats['tokens'] / max(seconds, 1e-9):.0f} tokens/s")
    return 0


if __name__ == "__main__":
    exit_quickly(main())

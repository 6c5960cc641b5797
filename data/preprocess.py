"""Turn documents (stdlib source, synthetic motifs, text/jsonl files) into indexed .bin/.idx files."""

import argparse
import glob
import json
import os
import sys
import sysconfig
import time
from typing import Iterable, Iterator, Optional

import numpy

from data.tokenizer import ByteTokenizer, build_tokenizer
from pretrain.errors import UserError, quiet_dependency_warnings

BYTE_VOCAB_SIZE = ByteTokenizer.vocab_size
QUICKSTART_MAX_BYTES = 4_000_000
# Folders of the stdlib that are not representative source (tests, IDE, third-party installs).
QUICKSTART_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})

# Synthetic corpus shape: short lowercase motifs repeated with rare noise, so that even a tiny model
# learns the unigram/bigram statistics (loss falls within tens of steps) and, later, copying.
SYNTHETIC_ALPHABET = numpy.arange(ord("a"), ord("z") + 1, dtype=numpy.int64)
SYNTHETIC_SEPARATOR = ord(" ")
SYNTHETIC_NUM_MOTIFS = 64
SYNTHETIC_NOISE = 0.05


def token_dtype(vocab_size: int) -> type:
    """uint16 halves the file size when every id fits; 65500 is megatron-core's own cut-off."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def write_indexed(
    docs: Iterable[list[int]], prefix: str, vocab_size: int, eod: Optional[int] = None
) -> dict:
    """Write PREFIX.bin/.idx, one sequence per document with `eod` appended; return the counts.

    `eod` defaults to vocab_size - 1, the byte tokenizer's EOD; pass the tokenizer's own otherwise.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import torch

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


def _stdlib_source_paths() -> list[str]:
    """Every *.py of the stdlib outside the skipped folders, sorted so the order is reproducible."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in QUICKSTART_SKIP_DIRS]
        paths.extend(os.path.join(folder, name) for name in files if name.endswith(".py"))
    return sorted(paths)


def quickstart_documents(max_bytes: int = QUICKSTART_MAX_BYTES) -> Iterator[str]:
    """One document per stdlib source file, in path order, stopping before max_bytes UTF-8 bytes."""
    total = 0
    for path in _stdlib_source_paths():
        with open(path, "rb") as file:
            raw = file.read()
        if total + len(raw) > max_bytes:
            return
        total += len(raw)
        yield raw.decode("utf-8", errors="replace")


def _read_stamp(prefix: str) -> Optional[dict]:
    try:
        with open(prefix + ".json") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _quickstart_is_current(prefix: str, max_bytes: int) -> Optional[dict]:
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


def synthetic_documents(num_docs: int, seed: int, vocab_size: int = BYTE_VOCAB_SIZE) -> Iterator[list[int]]:
    """Documents of 20..300 ids, each a repeated motif from a shared bank with 5% noise.

    numpy's legacy RandomState has a frozen stream and every draw names its dtype, so the
    documents are identical on every machine and numpy version (golden losses rely on this).
    """
    if vocab_size <= SYNTHETIC_ALPHABET[-1]:
        highest = int(SYNTHETIC_ALPHABET[-1])
        raise ValueError(f"synthetic documents use ids up to {highest}: vocab_size {vocab_size} is too small")
    rng = numpy.random.RandomState(seed)
    bank = [_random_motif(rng) for _ in range(SYNTHETIC_NUM_MOTIFS)]
    for _ in range(num_docs):
        length = int(rng.randint(20, 301, dtype=numpy.int64))
        motif = bank[int(rng.randint(0, SYNTHETIC_NUM_MOTIFS, dtype=numpy.int64))]
        repeats = length // motif.size + 1
        doc = numpy.tile(motif, repeats)[:length]
        noisy = rng.random_sample(length) < SYNTHETIC_NOISE
        noise = SYNTHETIC_ALPHABET[rng.randint(0, SYNTHETIC_ALPHABET.size, size=length, dtype=numpy.int64)]
        yield numpy.where(noisy, noise, doc).tolist()


def _random_motif(rng: numpy.random.RandomState) -> numpy.ndarray:
    """A 3..8-letter word followed by a space, so documents read as 'abcd abcd abcd ...'."""
    size = int(rng.randint(3, 9, dtype=numpy.int64))
    letters = SYNTHETIC_ALPHABET[rng.randint(0, SYNTHETIC_ALPHABET.size, size=size, dtype=numpy.int64)]
    return numpy.append(letters, SYNTHETIC_SEPARATOR)


def build_synthetic_corpus(prefix: str, num_docs: int = 2000, seed: int = 0) -> dict:
    """Write `num_docs` synthetic documents (byte vocabulary) to PREFIX.bin/.idx."""
    tokenizer = ByteTokenizer()
    docs = synthetic_documents(num_docs, seed, tokenizer.vocab_size)
    return write_indexed(docs, prefix, tokenizer.vocab_size, tokenizer.eod)


# ---- text: the user's own plain-text or jsonl files ----------------------------------------------


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths or globs, in the order given (each glob sorted), each checked to exist."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"input '{pattern}' matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise UserError(f"input '{path}' not found or not a file: give text or .jsonl files")
        paths.extend(matches)
    return paths


def text_documents(paths: list[str], text_key: str = "text") -> Iterator[str]:
    """One document per .jsonl line (field `text_key`) or per other (plain-text) file."""
    for path in paths:
        if path.endswith(".jsonl"):
            yield from _jsonl_documents(path, text_key)
        else:
            yield _read_text(path)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as error:
        message = f"input '{path}' is not UTF-8 text (byte {error.start}): convert it to UTF-8"
        raise UserError(message) from None


def _jsonl_documents(path: str, text_key: str) -> Iterator[str]:
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            line = _decode_line(raw, path, line_number)
            if line.strip():
                yield _jsonl_text(line, path, line_number, text_key)


def _decode_line(raw: bytes, path: str, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}:{line_number}: not UTF-8 text: convert the file to UTF-8") from None


def _jsonl_text(line: str, path: str, line_number: int, text_key: str) -> str:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not valid JSON ({error.msg}): each line must be one JSON object") from None
    if not isinstance(record, dict) or text_key not in record:
        raise UserError(f"{where}: no field '{text_key}': choose the field with --text-key")
    if not isinstance(record[text_key], str):
        raise UserError(f"{where}: field '{text_key}' is {type(record[text_key]).__name__}, not a string")
    return record[text_key]


def build_text_corpus(
    patterns: list[str], prefix: str, tokenizer_name: str = "byte", text_key: str = "text"
) -> dict:
    """Tokenize the user's files with `tokenizer_name` and write PREFIX.bin/.idx."""
    tokenizer = build_tokenizer(tokenizer_name)
    paths = expand_inputs(patterns)
    docs = (tokenizer.tokenize(text) for text in text_documents(paths, text_key))
    return write_indexed(docs, prefix, tokenizer.vocab_size, tokenizer.eod)


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
    text = commands.add_parser("text", help="your plain-text files or .jsonl files")
    text.add_argument("--input", nargs="+", required=True, help="files or globs")
    text.add_argument("--output-prefix", required=True)
    text.add_argument("--tokenizer", default="byte", help="'byte' or a local tokenizer.json path")
    text.add_argument("--text-key", default="text", help="jsonl field holding the text")
    return parser


def _run(args: argparse.Namespace) -> dict:
    if args.command == "quickstart":
        return build_quickstart_corpus(args.output_prefix, args.max_bytes)
    if args.command == "synthetic":
        return build_synthetic_corpus(args.output_prefix, args.num_docs, args.seed)
    return build_text_corpus(args.input, args.output_prefix, args.tokenizer, args.text_key)


def main(argv: Optional[list[str]] = None) -> int:
    """Build one corpus and print a one-line summary; bad input → one line on stderr, exit 2."""
    args = _parser().parse_args(argv)
    quiet_dependency_warnings()
    start = time.perf_counter()
    try:
        stats = _run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    verb = "kept up-to-date" if stats.get("skipped") else "wrote"
    seconds = time.perf_counter() - start
    print(
        f"{verb} {args.output_prefix}.bin/.idx: {stats['documents']} documents, "
        f"{stats['tokens']} tokens, {seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

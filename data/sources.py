"""Where documents come from: the standard library's source (the quickstart), synthetic motifs (the
tests), and the user's files or a hub dataset streamed through Hugging Face `datasets`."""

import os
import sysconfig
from collections.abc import Iterable, Iterator
from typing import Any

import numpy

from common.errors import UserError
from data.tokenizer import ByteTokenizer

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


def _stdlib_source_paths() -> list[str]:
    """Every *.py of the stdlib outside the skipped folders, sorted so the order is reproducible."""
    root = sysconfig.get_paths()["stdlib"]
    paths: list[str] = []
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


def synthetic_documents(
    num_docs: int, seed: int, vocab_size: int = BYTE_VOCAB_SIZE, lengths: tuple[int, int] = (20, 300)
) -> Iterator[list[int]]:
    """Documents of `lengths` (20..300 by default) ids, each a repeated motif from a shared bank
    with 5% noise.

    numpy's legacy RandomState has a frozen stream and every draw names its dtype, so the
    documents are identical on every machine and numpy version (golden losses rely on this).
    """
    if vocab_size <= SYNTHETIC_ALPHABET[-1]:
        highest = int(SYNTHETIC_ALPHABET[-1])
        raise ValueError(f"synthetic documents use ids up to {highest}: vocab_size {vocab_size} is too small")
    rng = numpy.random.RandomState(seed)
    bank = [_random_motif(rng) for _ in range(SYNTHETIC_NUM_MOTIFS)]
    for _ in range(num_docs):
        length = int(rng.randint(lengths[0], lengths[1] + 1, dtype=numpy.int64))
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


# The files data/streams.py reads through HF datasets (data/inputs.py reads the others itself).
INPUT_BUILDERS = {".json": "json", ".json.gz": "json", ".arrow": "arrow"}


def _builder_of(path: str) -> str:
    name = os.path.basename(path).lower()
    for ending, builder in INPUT_BUILDERS.items():
        if name.endswith(ending):
            return builder
    return "text"


def input_streams(
    paths: list[str], hub_name: str | None = None, hub_subset: str | None = None, hub_split: str = "train"
) -> Iterator[tuple[str, str, Iterable[dict]]]:
    """(name, builder, streaming rows) per input file, or for the one hub dataset asked for by name."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # read errors become our one line
    if hub_name is not None:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # its retry warnings would precede our one error line
        yield hub_name, "hub", _load(hub_name, "hub", hub_name, hub_subset, split=hub_split, streaming=True)
    for path in paths:
        if os.path.getsize(path) == 0:
            continue  # holds no documents (and datasets cannot infer a schema from it)
        builder = _builder_of(path)
        options = {"sample_by": "document"} if builder == "text" else {}
        yield path, builder, _load(path, builder, builder, data_files=[path], split="train", streaming=True, **options)


def _load(name: str, builder: str, *args: Any, **kwargs: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # datasets/pyarrow raise many types for unreadable input
        if builder == "hub":
            raise UserError(f"dataset '{name}' could not be loaded: {_first_line(error)}") from None
        raise UserError(f"input '{name}' cannot be read as {builder}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def text_documents(streams: Iterable[tuple[str, str, Iterable[dict]]], text_key: str = "text") -> Iterator[str]:
    """The text of every row; plain-text files are one document each (their column is 'text')."""
    for name, builder, rows in streams:
        key = "text" if builder == "text" else text_key
        try:
            for number, row in enumerate(rows, start=1):
                yield _row_text(row, key, name, number)
        except UserError:
            raise
        except Exception as error:  # datasets/pyarrow raise many types for unreadable input
            if builder == "hub":
                raise UserError(f"dataset '{name}' could not be read: {_first_line(error)}") from None
            raise UserError(f"input '{name}' cannot be read as {builder}: {_first_line(error)}") from None


def _row_text(row: dict, key: str, name: str, number: int) -> str:
    value = row.get(key)
    if value is None:
        fields = ", ".join(k for k, v in row.items() if v is not None)
        raise UserError(
            f"{name}: row {number}: no text in field '{key}' (fields: {fields}): choose the field with --text-key"
        )
    if not isinstance(value, str):
        raise UserError(f"{name}: row {number}: field '{key}' is {type(value).__name__}, not a string")
    return value

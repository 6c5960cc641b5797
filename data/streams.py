"""Inputs read front to back by the main process of `data.preprocess text` (compressed jsonl, files
read through `datasets`, a hub dataset), cut into the same Blocks on every pass, so that a rerun skips
the ones done; and the whole plan as the stream of Parts and Blocks the tokenizer processes get."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from typing import Any

from common.errors import UserError
from data.inputs import Block, Part, Source, first_line

READ_BLOCK = 8 << 20  # bytes read from a compressed stream at a time


def stream_blocks(source: Source, text_key: str, block_bytes: int) -> Iterator[Block]:
    """A streamed source cut into Blocks of about block_bytes; the same Blocks on every pass."""
    if source.kind == "lines":
        yield from _line_blocks(source, block_bytes)
    else:
        yield from _text_blocks(source, text_key, block_bytes)


def _line_blocks(source: Source, block_bytes: int) -> Iterator[Block]:
    """Blocks of whole lines, each ending at the first newline at or after block_bytes (so the same
    blocks whatever the read size); weights are compressed bytes, as far as the reader tells."""
    number, first_line, held, weighed, eof = 0, 1, b"", 0, False
    with _decompressed(source) as stream:
        while not eof:
            data = stream.read(READ_BLOCK)
            eof, held = not data, held + data
            while held and (eof or len(held) >= block_bytes):
                end = len(held) if eof else held.find(b"\n", block_bytes - 1) + 1
                if end == 0:
                    break  # the line that crosses block_bytes has not been read to its end yet
                block, held = held[:end], held[end:]
                position = source.weight if eof and not held else min(stream.position(), source.weight)
                weight, weighed = max(position - weighed, 0), max(position, weighed)
                yield Block(f"{source.index:05d}-{number:07d}", source.name, "lines", block, first_line, weight)
                first_line += block.count(b"\n")
                number += 1


class _decompressed:
    """A compressed file's bytes: gzip by the standard library, zstd by the `zstandard` package
    when installed, else the `zstd` program."""

    def __init__(self, source: Source):
        self.source = source
        self.process: subprocess.Popen | None = None
        self.stream: Any = None  # gzip.GzipFile or zstandard's stream reader

    def __enter__(self) -> Any:
        path = self.source.name
        if self.source.compression == "gzip":
            self.file = open(path, "rb")
            self.stream = gzip.GzipFile(fileobj=self.file, mode="rb")
            return _checked(self.stream, self.file, path, "gzip", (OSError, EOFError))
        try:
            import zstandard

            self.file = open(path, "rb")
            self.stream = zstandard.ZstdDecompressor().stream_reader(self.file)
            return _checked(self.stream, self.file, path, "zstd", (zstandard.ZstdError,))
        except ImportError:
            program = shutil.which("zstd")
            if program is None:
                raise UserError(
                    f"input '{path}' is zstd-compressed: install the zstandard package or the zstd program"
                ) from None
            self.process = subprocess.Popen([program, "-dc", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            return _checked_process(self.process, path)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            assert self.process.stdout is not None and self.process.stderr is not None
            self.process.stdout.close()
            self.process.stderr.close()
        else:
            self.stream.close()
            if hasattr(self, "file"):
                self.file.close()


class _checked:
    def __init__(self, stream: Any, raw: Any, path: str, what: str, errors: tuple):
        self.stream, self.raw, self.path, self.what, self.errors = stream, raw, path, what, errors

    def position(self) -> int:
        return self.raw.tell()  # compressed bytes read so far (ahead by the reader's buffer)

    def read(self, size: int) -> bytes:
        try:
            return self.stream.read(size)
        except self.errors as error:
            raise UserError(f"input '{self.path}' cannot be read as {self.what}: {first_line(error)}") from None


class _checked_process:
    def __init__(self, process: subprocess.Popen, path: str):
        self.process, self.path = process, path

    def position(self) -> int:
        return 0  # unknown: the whole file counts once it is read

    def read(self, size: int) -> bytes:
        assert self.process.stdout is not None and self.process.stderr is not None
        data = self.process.stdout.read(size)
        if not data and self.process.wait() != 0:
            message = self.process.stderr.read().decode(errors="replace").strip().splitlines()
            raise UserError(f"input '{self.path}' cannot be read as zstd: {message[-1] if message else 'zstd failed'}")
        return data


def _text_blocks(source: Source, text_key: str, block_bytes: int) -> Iterator[Block]:
    from data.sources import input_streams, text_documents

    if source.kind == "hub":
        subset, split = source.hub
        streams = input_streams([], source.name, subset, split)
    else:
        streams = input_streams([source.name])
    number, first_row, texts, held = 0, 1, [], 0
    for text in text_documents(streams, text_key):
        texts.append(text)
        held += len(text)
        if held >= block_bytes:
            yield Block(f"{source.index:05d}-{number:07d}", source.name, "texts", texts, first_row, 0)
            number, first_row, texts, held = number + 1, first_row + len(texts), [], 0
    if texts:
        yield Block(f"{source.index:05d}-{number:07d}", source.name, "texts", texts, first_row, 0)


def iter_plan(plan: Iterable[Source | Part], text_key: str, block_bytes: int) -> Iterator[Part | Block]:
    """Every Part of the plan, with each streamed Source read into its Blocks on the way."""
    for item in plan:
        if isinstance(item, Part):
            yield item
        else:
            yield from stream_blocks(item, text_key, block_bytes)

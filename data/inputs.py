"""The user's input for `data.preprocess text`, cut into parts: which rows each part holds, which
rows a shard (one of N machines) owns, and reading a part's texts inside a tokenizer process.

Every input has a place on one axis of bytes (the inputs one after the other, each as long as its
file). A shard I of N owns the rows that *start* in [I*T/N, (I+1)*T/N) of that axis, so the shards'
rows, in shard order, are exactly the rows of one run, in input order. Inputs that can be read from
the middle (jsonl at any line, parquet at any row group, a saved `datasets` folder at any row, a plain
text file as one row) are split into parts that the tokenizer processes read themselves. The rest
(compressed jsonl, JSON arrays, Arrow stream files, a hub dataset) is read front to back by the main
process (data/streams.py), which hands each part's lines or texts to a tokenizer process; such an
input is one unit for the shards: it belongs wholly to the shard where it starts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator
from typing import Any

from common.errors import UserError

# Kinds of input, by file ending (case-insensitive); a folder saved by `datasets` is "saved", any
# other file is "text" (one document).
COMPRESSED_JSONL = {".jsonl.gz": "gzip", ".jsonl.zst": "zstd", ".jsonl.zstd": "zstd"}
DATASETS_FILES = {".json": "json", ".json.gz": "json", ".arrow": "arrow"}  # read through `datasets`


@dataclasses.dataclass(frozen=True)
class Source:
    """One input in input order: its kind, its place on the byte axis and, for "saved", its files."""

    index: int
    name: str  # the path, or the hub dataset's name
    kind: str  # jsonl, parquet, saved, text (read by the workers); lines, rows, hub (streamed)
    weight: int  # bytes on the axis
    arrow_files: tuple[str, ...] = ()  # a saved dataset's Arrow files, in row order
    compression: str | None = None
    hub: tuple[str | None, str] = (None, "train")  # (subset, split) of a hub dataset

    @property
    def streamed(self) -> bool:
        return self.kind in ("lines", "rows", "hub")


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows of one source that a tokenizer process reads itself: a byte range of a jsonl, row groups
    of a parquet file, rows of a saved dataset's Arrow file, or a whole text file."""

    name: str  # the part's file name in the parts folder; sorting the names gives the output order
    source: str
    kind: str
    path: str
    start: int
    stop: int
    weight: int  # input bytes, for the progress line


@dataclasses.dataclass(frozen=True)
class Block:
    """Rows of a streamed source that the main process read: raw jsonl lines or texts."""

    name: str
    source: str
    kind: str  # "lines" or "texts"
    data: Any  # bytes (whole lines) or list[str]
    first_row: int  # 1-based number of its first line or row within the source
    weight: int


# ---- finding the inputs ---------------------------------------------------------------------------


def _kind_of(path: str) -> tuple[str, str | None]:
    if os.path.isdir(path):
        return "saved", None
    name = os.path.basename(path).lower()
    if name.endswith(".jsonl"):
        return "jsonl", None
    if name.endswith(".parquet"):
        return "parquet", None
    for ending, compression in COMPRESSED_JSONL.items():
        if name.endswith(ending):
            return "lines", compression
    if any(name.endswith(ending) for ending in DATASETS_FILES):
        return "rows", None
    return "text", None


def find_sources(
    patterns: list[str], hub: tuple[str, str | None, str] | None = None, split: str = "train"
) -> list[Source]:
    """The inputs named by paths or globs (each glob sorted), in the order given, then the hub dataset."""
    import glob

    sources: list[Source] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"input '{pattern}' matches no file")
        for path in matches:
            if not os.path.exists(path):
                raise UserError(f"input '{path}' not found: give files, globs or folders saved by datasets")
            kind, compression = _kind_of(path)
            if kind == "saved":
                files = saved_dataset_files(path, split)
                weight = sum(os.path.getsize(f) for f in files)
                sources.append(Source(len(sources), path, kind, weight, arrow_files=tuple(files)))
            else:
                sources.append(Source(len(sources), path, kind, os.path.getsize(path), compression=compression))
    if hub is not None:
        name, subset, hub_split = hub
        sources.append(Source(len(sources), name, "hub", 0, hub=(subset, hub_split)))
    return sources


def saved_dataset_files(folder: str, split: str) -> list[str]:
    """The Arrow files of a folder written by `datasets`' save_to_disk (a Dataset, or the `split` of a
    DatasetDict), in row order."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        with open(os.path.join(folder, "dataset_dict.json")) as file:
            splits = json.load(file).get("splits", [])
        if split not in splits:
            raise UserError(f"input '{folder}': a DatasetDict without split '{split}' (splits: {', '.join(splits)})")
        folder = os.path.join(folder, split)
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        raise UserError(
            f"input '{folder}' is a folder but not one saved by datasets' save_to_disk (no state.json): "
            "give files or globs"
        )
    with open(state) as file:
        names = [entry["filename"] for entry in json.load(file).get("_data_files", [])]
    return [os.path.join(folder, name) for name in names]


def fingerprint(sources: list[Source]) -> list[list]:
    """What identifies the inputs for a resume: name, kind, size and modification time of each file."""
    rows = []
    for source in sources:
        files = source.arrow_files or ((source.name,) if source.kind != "hub" else ())
        rows.append([source.name, source.kind, [[os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]])
    return rows


# ---- cutting the inputs into parts (and a shard's share) -----------------------------------------


def shard_window(sources: list[Source], shard: tuple[int, int]) -> tuple[int, int]:
    index, count = shard
    total = sum(source.weight for source in sources)
    return index * total // count, (index + 1) * total // count


def plan_parts(sources: list[Source], shard: tuple[int, int], part_bytes: int) -> list[Source | Part]:
    """In output order: the Parts the workers read, and the streamed Sources of this shard (the main
    process cuts those into Blocks while reading)."""
    lo, hi = shard_window(sources, shard)
    last = shard[0] == shard[1] - 1
    plan: list[Source | Part] = []
    offset = 0
    for source in sources:
        start, offset = offset, offset + source.weight
        # [a, b): this source's own coordinates of the window; the last shard takes every row to the end
        a, b = max(lo - start, 0), (source.weight if last else min(hi - start, source.weight))
        if source.kind in ("jsonl",):
            plan.extend(_jsonl_parts(source, a, b, part_bytes))
        elif source.kind == "parquet":
            plan.extend(_parquet_parts(source, a, b, part_bytes))
        elif source.kind == "saved":
            plan.extend(_saved_parts(source, a, b, part_bytes))
        elif a <= 0 < b or (source.weight == 0 and lo <= start and (start < hi or last)):
            # one unit: it belongs to the shard where it starts
            if source.kind == "text":
                plan.append(Part(f"{source.index:05d}-0000000", source.name, "text", source.name, 0, 1, source.weight))
            elif source.weight or source.kind == "hub":
                plan.append(source)
    return plan


def _line_start_at_or_after(file: io.BufferedReader, position: int, size: int) -> int:
    """The first byte of the first line that starts at or after `position`."""
    if position <= 0:
        return 0
    if position >= size:
        return size
    file.seek(position - 1)
    while True:
        block = file.read(1 << 16)
        if not block:
            return size
        newline = block.find(b"\n")
        if newline >= 0:
            return file.tell() - len(block) + newline + 1


def _jsonl_parts(source: Source, a: int, b: int, part_bytes: int) -> Iterator[Part]:
    if a >= b:
        return
    with open(source.name, "rb") as file:
        start = _line_start_at_or_after(file, a, source.weight)
        stop = _line_start_at_or_after(file, b, source.weight)
        number = 0
        while start < stop:
            end = min(_line_start_at_or_after(file, start + part_bytes, source.weight), stop)
            yield Part(f"{source.index:05d}-{number:07d}", source.name, "jsonl", source.name, start, end, end - start)
            start, number = end, number + 1


def _parquet_parts(source: Source, a: int, b: int, part_bytes: int) -> Iterator[Part]:
    """Row groups, each placed on the axis in proportion to its bytes, grouped up to part_bytes."""
    import pyarrow.parquet

    try:
        metadata = pyarrow.parquet.ParquetFile(source.name).metadata
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"input '{source.name}' cannot be read as parquet: {first_line(error)}") from None
    sizes = [max(metadata.row_group(i).total_byte_size, 1) for i in range(metadata.num_row_groups)]
    total, before, groups = sum(sizes), 0, []
    for i, size in enumerate(sizes):
        position = source.weight * before // total
        before += size
        if a <= position < b:
            groups.append((i, source.weight * size // total))
    number, first, held = 0, None, 0
    for position, (group, weight) in enumerate(groups):
        first = group if first is None else first
        held += weight
        if held >= part_bytes or position == len(groups) - 1:
            name = f"{source.index:05d}-{number:07d}"
            yield Part(name, source.name, "parquet", source.name, first, group + 1, held)
            number, first, held = number + 1, None, 0


def _saved_parts(source: Source, a: int, b: int, part_bytes: int) -> Iterator[Part]:
    """Rows of each Arrow file, row r of a file of n rows and s bytes at s*r//n on the axis."""
    offset, number = 0, 0
    for path in source.arrow_files:
        size, rows = os.path.getsize(path), arrow_rows(path)
        lo, hi = a - offset, b - offset
        offset += size
        if rows == 0 or hi <= 0 or lo >= size:
            continue
        first = 0 if lo <= 0 else -(-lo * rows // size)  # the first row r with size*r//rows >= lo
        end = rows if hi >= size else -(-hi * rows // size)
        step = max(1, part_bytes * rows // max(size, 1))
        for start in range(first, end, step):
            stop = min(start + step, end)
            weight = size * stop // rows - size * start // rows
            yield Part(f"{source.index:05d}-{number:07d}", source.name, "saved", path, start, stop, weight)
            number += 1


def arrow_rows(path: str) -> int:
    return _arrow_table(path).num_rows


def _arrow_table(path: str) -> Any:
    import pyarrow

    try:
        return pyarrow.ipc.open_stream(pyarrow.memory_map(path)).read_all()  # zero-copy from the page cache
    except Exception as error:  # pyarrow raises several types for a file that is not Arrow
        raise UserError(f"input '{path}' cannot be read as Arrow: {first_line(error)}") from None


# ---- reading (in the tokenizer processes) ---------------------------------------------------------


def part_texts(part: Part | Block, text_key: str) -> tuple[list[str], int]:
    """(the part's texts, in order; the number of blank lines left out)."""
    if isinstance(part, Block):
        if part.kind == "texts":
            return part.data, 0
        return jsonl_texts(part.data, text_key, part.source, part.first_row)
    if part.kind == "jsonl":
        with open(part.path, "rb") as file:
            file.seek(part.start)
            data = file.read(part.stop - part.start)
        try:
            return jsonl_texts(data, text_key, part.source, 1)
        except _RowError as error:  # line numbers are counted from the file's start only when needed
            with open(part.path, "rb") as file:
                line = file.read(part.start).count(b"\n") + error.line
            raise UserError(f"{part.source}: line {line}: {error.problem}") from None
    if part.kind == "parquet":
        return _parquet_texts(part, text_key), 0
    if part.kind == "saved":
        table = _arrow_table(part.path).slice(part.start, part.stop - part.start)
        return _column_texts(table, text_key, part.source, part.start), 0
    return [_text_file(part.path)], 0


class _RowError(Exception):
    def __init__(self, line: int, problem: str):
        super().__init__(problem)
        self.line, self.problem = line, problem


def jsonl_texts(data: bytes, text_key: str, source: str, first_line: int) -> tuple[list[str], int]:
    """The `text_key` field of each JSON line of `data` (whole lines); blank lines are left out."""
    texts, blank = [], 0
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # after the last newline
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError as error:
            if not line.strip():
                blank += 1
                continue
            _row_problem(source, first_line, number, f"not a JSON line ({error})")
        if not isinstance(row, dict):
            _row_problem(source, first_line, number, f"a JSON {type(row).__name__}, not an object")
        value = row.get(text_key)
        if not isinstance(value, str):
            _row_problem(source, first_line, number, _field_problem(row, text_key, value))
        texts.append(value)
    return texts, blank


def _row_problem(source: str, first_line: int, number: int, problem: str) -> None:
    if first_line == 1:
        raise _RowError(number + 1, problem)  # the caller knows where the data started
    raise UserError(f"{source}: line {first_line + number}: {problem}")


def _field_problem(row: dict, key: str, value: Any) -> str:
    if value is None:
        fields = ", ".join(k for k, v in row.items() if v is not None)
        return f"no text in field '{key}' (fields: {fields}): choose the field with --text-key"
    return f"field '{key}' is {type(value).__name__}, not a string"


def _parquet_texts(part: Part, text_key: str) -> list[str]:
    import pyarrow.parquet

    file = pyarrow.parquet.ParquetFile(part.path)
    if text_key not in file.schema_arrow.names:
        names = ", ".join(file.schema_arrow.names)
        raise UserError(f"{part.source}: no column '{text_key}' (columns: {names}): choose the field with --text-key")
    table = file.read_row_groups(list(range(part.start, part.stop)), columns=[text_key])
    first_row = sum(file.metadata.row_group(i).num_rows for i in range(part.start))
    return _column_texts(table, text_key, part.source, first_row)


def _column_texts(table: Any, text_key: str, source: str, first_row: int) -> list[str]:
    import pyarrow

    if text_key not in table.column_names:
        names = ", ".join(table.column_names)
        raise UserError(f"{source}: no column '{text_key}' (columns: {names}): choose the field with --text-key")
    column = table.column(text_key)
    if not (pyarrow.types.is_string(column.type) or pyarrow.types.is_large_string(column.type)):
        raise UserError(f"{source}: column '{text_key}' is {column.type}, not a string")
    if column.null_count:
        row = first_row + column.is_null().to_pylist().index(True) + 1
        raise UserError(f"{source}: row {row}: no text in field '{text_key}' (null)")
    return column.to_pylist()


def _text_file(path: str) -> str:
    with open(path, "rb") as file:
        data = file.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"input '{path}' is not UTF-8 text (byte {error.start}): {error.reason}") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

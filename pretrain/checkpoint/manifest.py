"""Checkpoint integrity: every file's size and CRC32 recorded when a checkpoint is saved
(`manifest.json`), and the check that runs before any tensor of a checkpoint is read."""

from __future__ import annotations

import json
import pathlib
import zlib
from collections.abc import Iterable
from typing import Any

MANIFEST = "manifest.json"
_PART = ".manifest.rank{}.json"  # one rank's files, written by it (or its background writer) in iter_N.tmp
_CHUNK = 16 << 20


def crc32_of(path: pathlib.Path) -> str:
    """The file's CRC32 as 8 hex digits (zlib's, about 0.3 s per GiB on one core: docs/benchmarks.md)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _records(paths: Iterable[pathlib.Path]) -> dict[str, dict[str, Any]]:
    return {p.name: {"size": p.stat().st_size, "crc32": crc32_of(p)} for p in paths}


def record_rank_files(tmp: pathlib.Path, rank: int) -> None:
    """After this rank wrote its shards (`__R_*.distcp`, torch_dist's names): their sizes and CRC32s,
    in a part file rank 0 merges when it publishes. Runs in the background writer for async saves."""
    files = sorted(tmp.glob(f"__{rank}_*.distcp"))
    (tmp / _PART.format(rank)).write_text(json.dumps(_records(files)))


def write_manifest(tmp: pathlib.Path) -> None:
    """Rank 0, every rank's shards on disk: merges the part files and records the files no part
    covers (`.metadata`, `common.pt`, `metadata.json`, any other) into `manifest.json`."""
    files: dict[str, dict[str, Any]] = {}
    parts = sorted(tmp.glob(_PART.format("*")))
    for part in parts:
        files.update(json.loads(part.read_text()))
    skip = {MANIFEST, *(p.name for p in parts)}
    rest = [p for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in skip and p.name not in files]
    files.update(_records(rest))
    (tmp / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True) + "\n")
    for part in parts:
        part.unlink()


def problems(path: pathlib.Path, verify: bool, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with checkpoint `path`, before anything in it is loaded; [] when intact.

    Sizes (and the presence of every file) are always checked, CRC32s when `verify`: of the files
    whose sorted position is `share[0]` modulo `share[1]` (ranks split the reading; each rank's
    findings are gathered by the caller). A checkpoint saved before manifests existed is checked
    against its own `.metadata`: every shard file it names is there and long enough."""
    wrong = _metadata_problems(path)
    if wrong:
        return wrong
    extents = _storage_extents(path)
    if extents is None:
        return [".metadata is garbled"]
    manifest = path / MANIFEST
    if not manifest.is_file():
        return _legacy_problems(path, extents)
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = sorted((str(k), int(v["size"]), str(v["crc32"])) for k, v in files.items())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return [f"{MANIFEST} is garbled"]
    for i, (name, size, crc) in enumerate(entries):
        wrong += _file_problems(path / name, size, crc if verify and i % share[1] == share[0] else None)
    return wrong


def _file_problems(file: pathlib.Path, size: int, crc: str | None) -> list[str]:
    if not file.is_file():
        return [f"{file.name} is missing"]
    actual = file.stat().st_size
    if actual < size:
        return [f"{file.name} is truncated from {size} to {actual} bytes"]
    if actual > size:
        return [f"{file.name} has {actual} bytes, {size} when saved"]
    if crc is not None and crc32_of(file) != crc:
        return [f"{file.name} fails its checksum (CRC32 {crc32_of(file)}, {crc} when saved)"]
    return []


def _metadata_problems(path: pathlib.Path) -> list[str]:
    """`metadata.json` and torch's `.metadata`: present and readable (both are small)."""
    meta = path / "metadata.json"
    if not meta.is_file():
        return ["metadata.json is missing"]
    try:
        if not isinstance(json.loads(meta.read_text()), dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        return ["metadata.json is garbled (not a JSON object)"]
    if not (path / ".metadata").is_file():
        return [".metadata is missing"]
    return []


def _legacy_problems(path: pathlib.Path, extents: dict[str, int]) -> list[str]:
    """No manifest: the shard files `.metadata` names exist and reach the last byte it reads."""
    wrong = []
    for name, end in sorted(extents.items()):
        file = path / name
        if not file.is_file():
            wrong.append(f"{name} is missing")
        elif file.stat().st_size < end:
            wrong.append(f"{name} is truncated to {file.stat().st_size} bytes (its data reaches byte {end})")
    return wrong


def _storage_extents(path: pathlib.Path) -> dict[str, int] | None:
    """File name -> the end of the last item `.metadata` places in it; None when it cannot be read.
    One that would run code raises upstream/safe_loading.py's UnsafeFile (refused, not skipped)."""
    import pickle

    from upstream import safe_loading

    try:
        meta = safe_loading.unpickle_or_refuse(
            safe_loading.MetadataUnpickler, (path / ".metadata").read_bytes(), ".metadata"
        )
        extents: dict[str, int] = {}
        for info in (getattr(meta, "storage_data", None) or {}).values():
            end = int(info.offset) + int(info.length)
            extents[info.relative_path] = max(extents.get(info.relative_path, 0), end)
        return extents
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError):
        return None

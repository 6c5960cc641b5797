"""The resumable unit of `data.preprocess text`: tokenizer processes that read, tokenize and commit
parts in PREFIX.parts/, the folder's record of what is done, the final join into PREFIX.bin/.idx, and
the progress line."""

import dataclasses
import functools
import json
import multiprocessing
import os
import queue
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy

from common.errors import UserError
from data.inputs import Block, Part, part_texts
from data.tokenizer import ByteTokenizer, HFTokenizer

IN_FLIGHT_PER_WORKER = 4  # parts queued per worker: bounds memory for streamed inputs
PLAN_FORMAT = 1  # bump when the parts folder's layout changes: an old folder is then refused


def _indexed_dataset_builder():
    """megatron-core's IndexedDatasetBuilder; on a CPU-only machine megatron-core is first imported
    with its JIT fuser off (upstream/process.py), which takes most of the import time off a corpus
    build."""
    from upstream.process import import_megatron_without_jit_fusers

    import_megatron_without_jit_fusers()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return IndexedDatasetBuilder


@dataclasses.dataclass
class WorkerSetup:
    """What a tokenizer process needs, sent once (a HF tokenizer pickles as its JSON): no worker
    reads a tokenizer file or asks the hub again."""

    tokenizer: ByteTokenizer | HFTokenizer
    tokenizer_name: str
    text_key: str
    folder: str  # the parts folder
    dtype: str


_WORKER: WorkerSetup | None = None


def _init_worker(setup: WorkerSetup) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _WORKER = setup
    _exit_with_parent()


def _exit_with_parent() -> None:
    """A worker of a killed main process stops at once (Linux), instead of finishing its part and
    then waiting forever; a rerun's workers are then the only writers of the parts folder."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)  # the main process was gone before the line above


def tokenize_part(part: Part | Block, setup: WorkerSetup | None = None) -> dict:
    """Read a part's texts, tokenize them and commit PART.bin (ids, an EOD after each document) and
    then PART.json (its counts and document lengths): a part with its .json is done.

    Documents without a single token are left out, as Megatron-LM's preprocess_data.py does: a
    lone EOD would only teach the model to follow EOD with EOD."""
    setup = setup or _WORKER
    assert setup is not None, "a pool worker's setup comes from _init_worker"
    texts, blank = part_texts(part, setup.text_key)
    flat, lengths = flatten(setup.tokenizer.tokenize_batch(texts), setup)
    record = {
        "documents": len(lengths),
        "tokens": int(flat.size),
        "empty": len(texts) - len(lengths),
        "blank": blank,
        "weight": part.weight,
        "lengths": lengths,
    }
    path = os.path.join(setup.folder, part.name)
    temporary = f"{path}.{os.getpid()}.tmp"  # a stale worker of a killed run writes its own file
    flat.tofile(temporary)
    os.replace(temporary, path + ".bin")
    with open(temporary, "w") as file:
        json.dump(record, file)
    os.replace(temporary, path + ".json")
    return {**record, "lengths": None}


def flatten(docs: list, setup: WorkerSetup) -> tuple[numpy.ndarray, list[int]]:
    """(the non-empty documents' ids, each followed by the EOD, in the file's dtype; their lengths)."""
    kept = [doc for doc in docs if len(doc)]
    lengths = [len(doc) + 1 for doc in kept]
    eod, vocab_size = setup.tokenizer.eod, setup.tokenizer.vocab_size
    if kept and isinstance(kept[0], numpy.ndarray):  # the byte tokenizer: arrays of bytes
        tail = numpy.array([eod])
        flat = numpy.concatenate([piece for doc in kept for piece in (doc, tail)]).astype(setup.dtype)
        return flat, lengths
    ids: list[int] = []
    for doc in kept:
        ids += doc
        ids.append(eod)
    try:
        flat = numpy.array(ids, dtype=setup.dtype)  # one pass, no int64 copy (numpy refuses ids that do not fit)
        highest = int(flat.max()) if flat.size else 0
    except OverflowError:
        highest = max(ids)
    if highest >= vocab_size:
        raise UserError(
            f"tokenizer '{setup.tokenizer_name}' produced id {highest} outside its vocabulary of {vocab_size} ids"
        )
    return flat, lengths


# ---- the parts folder: what is done, so that a rerun of the same command resumes -----------------


def _done_parts(folder: str, dtype: str) -> dict[str, dict]:
    """The parts committed in `folder` (name -> record), checked against their .bin sizes; anything
    half-written by a killed run is removed."""
    itemsize = numpy.dtype(dtype).itemsize
    done = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.endswith(".tmp"):
            os.remove(path)
        elif entry.endswith(".json") and entry != "plan.json":
            name = entry[: -len(".json")]
            try:
                with open(path) as file:
                    record = json.load(file)
                whole = os.path.getsize(os.path.join(folder, name + ".bin")) == record["tokens"] * itemsize
            except (OSError, ValueError, KeyError):
                whole = False
            if whole:
                done[name] = record
            else:  # e.g. zero-length after a machine crash: do it again
                os.remove(path)
    return done


def open_parts(out: str, plan: dict, overwrite: bool) -> dict[str, dict]:
    """The parts already done for this very run (same inputs and options), after the checks that
    keep a finished output from being overwritten by accident."""
    folder = out + ".parts"
    plan_path = os.path.join(folder, "plan.json")
    if overwrite and os.path.isdir(folder):
        shutil.rmtree(folder)
    if os.path.isfile(plan_path):
        with open(plan_path) as file:
            try:
                before = json.load(file)
            except ValueError:
                before = None
        if before == plan:
            return _done_parts(folder, plan["dtype"])
        what = ", ".join(k for k in plan if before is None or before.get(k) != plan[k]) or "format"
        raise UserError(
            f"{folder} holds the parts of another run (its {what} differ): rerun that command to finish "
            "it, or pass --overwrite to start this one"
        )
    if not overwrite and (os.path.exists(out + ".bin") or os.path.exists(out + ".idx")):
        raise UserError(f"{out}.bin/.idx already exist: pass --overwrite to replace them")
    os.makedirs(folder, exist_ok=True)
    with open(plan_path + ".tmp", "w") as file:
        json.dump(plan, file)
    os.replace(plan_path + ".tmp", plan_path)
    return {}


def finalize(out: str, names: list[str], records: dict[str, dict], dtype: str) -> None:
    """Join the parts, in order, into OUT.bin/.idx with megatron-core's builder (written under
    temporary names and renamed, .bin first), then remove the parts folder. A run killed in here
    redoes only this step."""
    IndexedDatasetBuilder = _indexed_dataset_builder()
    folder = out + ".parts"
    builder = IndexedDatasetBuilder(out + ".tmp.bin", dtype=numpy.dtype(dtype).type)
    for name in names:
        # what IndexedDatasetBuilder.add_index does with a .bin/.idx pair, with a part's lengths
        lengths = records[name]["lengths"]
        first = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(lengths)
        builder.document_indices.extend(range(first + 1, first + len(lengths) + 1))
        with open(os.path.join(folder, name + ".bin"), "rb") as part:
            shutil.copyfileobj(part, builder.data_file, 16 << 20)
    builder.finalize(out + ".tmp.idx")
    os.replace(out + ".tmp.bin", out + ".bin")
    os.replace(out + ".tmp.idx", out + ".idx")
    shutil.rmtree(folder)


# ---- running the parts --------------------------------------------------------------------------


class Progress:
    """Input bytes done of the total, bytes/s, tokens/s and the time left: rewritten in place on a
    terminal (every half second), a line every `interval` seconds in a log."""

    def __init__(self, total: int, enabled: bool, interval: float = 30.0):
        self.total, self.done, self.tokens, self.new_bytes = total, 0, 0, 0
        self.tty = enabled and sys.stderr.isatty()
        self.enabled, self.interval = enabled, (0.5 if self.tty else interval)
        self.start = self.shown = time.perf_counter()

    def add(self, weight: int, tokens: int, resumed: bool = False) -> None:
        self.done += weight
        self.tokens += 0 if resumed else tokens
        self.new_bytes += 0 if resumed else weight
        now = time.perf_counter()
        if self.enabled and not resumed and now - self.shown >= self.interval:
            self.shown = now
            self._show(now)

    def _show(self, now: float) -> None:
        seconds = max(now - self.start, 1e-9)
        rate = self.new_bytes / seconds
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}" if left < 1e7 else "?"
        line = (
            f"preprocess: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
            f"({100 * self.done / max(self.total, 1):.0f} %), {rate / 1e6:.2f} MB/s, "
            f"{self.tokens / seconds:,.0f} tokens/s, ETA {eta}"
        )
        print(f"\r{line}\033[K" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def run_parts(
    items: Iterable[Part | Block], done: dict[str, dict], setup: WorkerSetup, workers: int, progress: Progress
) -> list[str]:
    """Tokenize every part not done yet (with `workers` processes when more than one); return every
    part's name, in output order, with the records of the new ones added to `done`."""
    names: list[str] = []
    todo = _not_done(items, done, names, progress)
    if workers <= 1:
        for part in todo:
            _collect(part.name, tokenize_part(part, setup), done, progress)
        return names
    # spawn, not fork: the main process may already run tokenizer threads (a BPE trained here)
    context = multiprocessing.get_context("spawn")
    results: queue.SimpleQueue = queue.SimpleQueue()
    with context.Pool(workers, initializer=_init_worker, initargs=(setup,)) as pool:
        in_flight = 0
        for part in todo:
            while in_flight >= workers * IN_FLIGHT_PER_WORKER:
                in_flight -= _take(results, done, progress)
            pool.apply_async(
                tokenize_part,
                (part,),
                callback=functools.partial(_put, results, part.name),
                error_callback=functools.partial(_put, results, None),
            )
            in_flight += 1
        while in_flight:
            in_flight -= _take(results, done, progress)
    return names


def _put(results: queue.SimpleQueue, name: str | None, outcome: Any) -> None:
    results.put((name, outcome))


def _not_done(items: Iterable[Part | Block], done: dict, names: list[str], progress: Progress) -> Iterator:
    for item in items:
        names.append(item.name)
        if item.name in done:
            progress.add(done[item.name]["weight"], done[item.name]["tokens"], resumed=True)
        else:
            yield item


def _take(results: queue.SimpleQueue, done: dict, progress: Progress) -> int:
    name, record = results.get()
    if name is None:
        raise record  # a worker's exception (a UserError for bad input) ends the run
    _collect(name, record, done, progress)
    return 1


def _collect(name: str, record: dict, done: dict, progress: Progress) -> None:
    done[name] = record
    progress.add(record["weight"], record["tokens"])


def part_record(folder: str, name: str, record: dict) -> dict:
    """The part's record with its document lengths (workers return them only in the .json)."""
    if record.get("lengths") is None:
        with open(os.path.join(folder, name + ".json")) as file:
            return json.load(file)
    return record

"""Turn documents (stdlib source, synthetic motifs, the user's files or a hub dataset) into indexed .bin/.idx files."""

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import queue
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy

from common.errors import EXIT_USER_ERROR, UserError, path_problem
from data.inputs import Block, Part, Source, find_sources, fingerprint, iter_plan, part_texts, plan_parts, shard_window
from data.sources import BYTE_VOCAB_SIZE, QUICKSTART_MAX_BYTES, quickstart_documents, synthetic_documents
from data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer


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


def build_synthetic_corpus(prefix: str, num_docs: int = 2000, seed: int = 0) -> dict:
    """Write `num_docs` synthetic documents (byte vocabulary) to PREFIX.bin/.idx."""
    tokenizer = ByteTokenizer()
    docs = synthetic_documents(num_docs, seed, tokenizer.vocab_size)
    return write_indexed(docs, prefix, tokenizer.vocab_size, tokenizer.eod)


# ---- text: the user's files or a hub dataset, read through HF datasets, streamed -----------------

# ---- text: the user's files or a hub dataset, cut into parts, tokenized by worker processes ------

EOD_TOKEN = "<|endoftext|>"  # the EOD of a tokenizer trained here (data.tokenizer finds it by name)
PARTS_AIMED = 64  # parts per run (or shard) when --part-bytes is not given: resume loses at most one
PART_BYTES_MIN, PART_BYTES_MAX = 1 << 20, 16 << 20  # ...within these bounds
IN_FLIGHT_PER_WORKER = 4  # parts queued per worker: bounds memory for streamed inputs
PLAN_FORMAT = 1  # bump when the parts folder's layout changes: an old folder is then refused


@dataclasses.dataclass
class _WorkerSetup:
    """What a tokenizer process needs, sent once (a HF tokenizer pickles as its JSON): no worker
    reads a tokenizer file or asks the hub again."""

    tokenizer: ByteTokenizer | HFTokenizer
    tokenizer_name: str
    text_key: str
    folder: str  # the parts folder
    dtype: str


_WORKER: _WorkerSetup | None = None


def _init_worker(setup: _WorkerSetup) -> None:
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


def tokenize_part(part: Part | Block, setup: _WorkerSetup | None = None) -> dict:
    """Read a part's texts, tokenize them and commit PART.bin (ids, an EOD after each document) and
    then PART.json (its counts and document lengths): a part with its .json is done.

    Documents without a single token are left out, as Megatron-LM's preprocess_data.py does: a
    lone EOD would only teach the model to follow EOD with EOD."""
    setup = setup or _WORKER
    assert setup is not None, "a pool worker's setup comes from _init_worker"
    texts, blank = part_texts(part, setup.text_key)
    flat, lengths = _flatten(setup.tokenizer.tokenize_batch(texts), setup)
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


def _flatten(docs: list, setup: _WorkerSetup) -> tuple[numpy.ndarray, list[int]]:
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


def _open_parts(out: str, plan: dict, overwrite: bool) -> dict[str, dict]:
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


def _finalize(out: str, names: list[str], records: dict[str, dict], dtype: str) -> None:
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


def _run_parts(
    items: Iterable[Part | Block], done: dict[str, dict], setup: _WorkerSetup, workers: int, progress: Progress
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
    done = _open_parts(out, plan, overwrite)
    resumed = len(done)
    try:
        parts = plan_parts(sources, shard, part_bytes)
        total = sum(item.weight for item in parts)
        setup = _WorkerSetup(tokenizer, tokenizer_name, text_key, out + ".parts", dtype)
        meter = Progress(total, progress)
        names = _run_parts(iter_plan(parts, text_key, part_bytes), done, setup, workers, meter)
        meter.close()
        counts = {key: sum(done[name][key] for name in names) for key in ("documents", "tokens", "empty", "blank")}
        if counts["documents"] == 0 and shard[1] == 1:
            raise UserError("the input holds no documents: nothing to write")
        records = {name: _lengths(out + ".parts", name, done[name]) for name in names}
        _finalize(out, names, records, dtype)
    except UserError:
        shutil.rmtree(out + ".parts", ignore_errors=True)  # bad input: its parts are of no use
        raise
    return {**stats, **counts, "parts": len(names), "resumed_parts": resumed}


def _lengths(folder: str, name: str, record: dict) -> dict:
    """The part's record with its document lengths (workers return them only in the .json)."""
    if record.get("lengths") is None:
        with open(os.path.join(folder, name + ".json")) as file:
            return json.load(file)
    return record


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

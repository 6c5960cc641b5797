"""Preprocessing against the tokenizer's own limit: `python -m data.preprocess text` and Megatron-LM's
tools/preprocess_data.py beside the `tokenizers` library encoding the same documents alone.

The input is the quickstart corpus (stdlib source, one jsonl row per file) repeated up to --size-mb;
the tokenizer a byte-level BPE trained on one copy of it by our --train-tokenizer (Megatron-LM loads
it through transformers). Per round, in turns:
- limit: the documents read into memory first (not timed), then `Tokenizer.encode_batch_fast` (the
  same ids as encode_batch, without offsets; encode_batch is timed too) over batches of documents
  on --workers threads (RAYON_NUM_THREADS), no I/O: the tokenizer's throughput on these cores;
- ours and Megatron-LM's: whole processes (start-up and imports included), --workers processes.
tokens/s counts the tokens written (an EOD per document included) over wall seconds; each tool's
ratio is its tokens/s over the limit's. The .bin files are compared byte for byte. --profile times
the stages of our tokenizer process (read + JSON decode, tokenize, ids to an array, write) on a few
parts in this process.

Megatron-LM is not part of this project: point --megatron-lm at a checkout holding
tools/preprocess_data.py and megatron/training (and --extra-path at what it imports beyond our venv).
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from benchmarks.common import REPO

LIMIT = """
import json, os, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2], "rb")]
batch, encode = int(sys.argv[3]), getattr(tokenizer, sys.argv[4])
seconds, tokens, documents = 0.0, 0, 0
for first in range(0, len(texts), batch):
    start = time.perf_counter()
    encodings = encode(texts[first : first + batch], add_special_tokens=False)
    seconds += time.perf_counter() - start  # the encoding alone: not even taking the ids out
    lengths = [len(encoding) for encoding in encodings]
    # documents without tokens are left out by both tools, EOD and all
    tokens, documents = tokens + sum(n + 1 for n in lengths if n), documents + sum(1 for n in lengths if n)
print(json.dumps({"seconds": seconds, "tokens": tokens, "documents": documents}))
"""


def write_corpus(path: pathlib.Path, size_mb: float) -> tuple[int, int]:
    """The quickstart corpus as jsonl, repeated until it holds size_mb MB; (documents, bytes)."""
    from data.sources import quickstart_documents

    lines = [json.dumps({"text": text}) + "\n" for text in quickstart_documents()]
    one = sum(len(line.encode()) for line in lines)
    repeat = max(1, round(size_mb * 1e6 / one))
    if not (path.exists() and path.stat().st_size == one * repeat):
        with open(path, "w") as file:
            for _ in range(repeat):
                file.writelines(lines)
    return len(lines) * repeat, one * repeat


def train_tokenizer(folder: pathlib.Path, vocab_size: int) -> None:
    corpus = folder / "one_copy.jsonl"
    write_corpus(corpus, 0)
    command = [sys.executable, "-m", "data.preprocess", "text", "--input", str(corpus), "--no-progress"]
    command += ["--train-tokenizer", str(vocab_size), "--output-prefix", str(folder / "train_corpus"), "--overwrite"]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    # transformers' AutoTokenizer (Megatron-LM's HuggingFaceTokenizer) needs the class and the EOD name
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the waited-for worker processes
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], cwd: pathlib.Path | str, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its workers, stdout) of one whole run."""
    cpu, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, _children_cpu() - cpu, proc.stdout


def tokens_in(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)  # kept alive while its memory-mapped arrays are read
    return int(indexed.sequence_lengths.sum())


def profile_stages(corpus: pathlib.Path, tokenizer_path: pathlib.Path, parts: int) -> None:
    """Seconds per stage of our tokenizer process over the first `parts` parts of the input."""
    import numpy

    from data.inputs import Part, find_sources, part_texts, plan_parts
    from data.parts import WorkerSetup, flatten
    from data.tokenizer import build_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(str(tokenizer_path))
    setup = WorkerSetup(tokenizer, str(tokenizer_path), "text", "/tmp", "uint16")
    plan = [part for part in plan_parts(find_sources([str(corpus)]), (0, 1), 4 << 20) if isinstance(part, Part)]
    plan = plan[:parts]
    stages = {"read + JSON decode": 0.0, "tokenize": 0.0, "ids to an array": 0.0, "write": 0.0}
    out = corpus.parent / "profile.bin"
    for part in plan:
        start = time.perf_counter()
        texts, _ = part_texts(part, "text")
        read = time.perf_counter()
        docs = tokenizer.tokenize_batch(texts)
        tokenized = time.perf_counter()
        flat, _ = flatten(docs, setup)
        flattened = time.perf_counter()
        flat.tofile(out)
        numpy.zeros(1).tofile(out.with_suffix(".json"))
        done = time.perf_counter()
        for name, seconds in zip(stages, (read - start, tokenized - read, flattened - tokenized, done - flattened)):
            stages[name] += seconds
    total = sum(stages.values())
    print(f"profile of {len(plan)} parts of 4 MiB in one tokenizer process ({total:.2f} s):")
    for name, seconds in stages.items():
        print(f"  {name}: {seconds:.3f} s ({100 * seconds / total:.1f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megatron-lm", help="folder with tools/preprocess_data.py (left out: not run)")
    parser.add_argument("--extra-path", default="", help="PYTHONPATH entries Megatron-LM's script needs")
    parser.add_argument("--work", default="/tmp/bench_preprocess")
    parser.add_argument("--size-mb", type=float, default=40, help="input size (copies of the quickstart corpus)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="documents per encode_batch call of the limit")
    parser.add_argument("--encode-batch", action="store_true", help="also time encode_batch as a limit")
    parser.add_argument("--profile", type=int, default=0, metavar="PARTS", help="profile our stages on PARTS parts")
    args = parser.parse_args()

    work = pathlib.Path(args.work)
    (work / "tok").mkdir(parents=True, exist_ok=True)
    if not (work / "tok" / "tokenizer.json").exists():
        train_tokenizer(work / "tok", args.vocab_size)
    corpus = work / f"quickstart_{args.size_mb:g}mb.jsonl"
    documents, size = write_corpus(corpus, args.size_mb)
    if args.profile:
        profile_stages(corpus, work / "tok" / "tokenizer.json", args.profile)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    limit_env = dict(env, TOKENIZERS_PARALLELISM="true", RAYON_NUM_THREADS=str(args.workers))
    limit = [sys.executable, "-c", LIMIT, str(work / "tok" / "tokenizer.json"), str(corpus), str(args.batch)]
    ours = [sys.executable, "-m", "data.preprocess", "text", "--input", str(corpus), "--tokenizer"]
    ours += [str(work / "tok"), "--workers", str(args.workers), "--output-prefix", str(work / "ours" / "corpus")]
    ours += ["--overwrite", "--no-progress"]
    commands: dict[str, tuple] = {
        "limit (encode_batch_fast)": (limit + ["encode_batch_fast"], REPO, limit_env),
        "ours": (ours, REPO, env),
    }
    if args.encode_batch:
        commands["limit (encode_batch)"] = (limit + ["encode_batch"], REPO, limit_env)
    if args.megatron_lm:
        theirs = [sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix"]
        theirs += [str(work / "megatron" / "corpus"), "--tokenizer-type", "HuggingFaceTokenizer"]
        theirs += ["--tokenizer-model", str(work / "tok"), "--workers", str(args.workers), "--append-eod"]
        theirs += ["--json-keys", "text"]
        (work / "megatron").mkdir(exist_ok=True)
        path = os.pathsep.join(p for p in (args.megatron_lm, args.extra_path) if p)
        commands["Megatron-LM"] = (theirs, args.megatron_lm, dict(env, PYTHONPATH=path))
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in commands}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, (cmd, cwd, cmd_env) in commands.items():
            wall, cpu, stdout = timed(cmd, cwd, cmd_env)
            if name.startswith("limit"):
                measured = json.loads(stdout.strip().splitlines()[-1])
                runs[name].append((measured["seconds"], cpu, measured["tokens"]))
            else:
                runs[name].append((wall, cpu, 0))
    ours_prefix, theirs_prefix = str(work / "ours" / "corpus"), str(work / "megatron" / "corpus_text_document")
    tokens = tokens_in(ours_prefix)
    limit_tokens = {run[2] for name in runs if name.startswith("limit") for run in runs[name]}
    print(f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"input {corpus}: {documents} rows, {size / 1e6:.1f} MB; {tokens} tokens written; limit counted {limit_tokens}"
    )
    if args.megatron_lm:
        same = pathlib.Path(ours_prefix + ".bin").read_bytes() == pathlib.Path(theirs_prefix + ".bin").read_bytes()
        print(f"identical .bin (ours, Megatron-LM): {same and tokens == tokens_in(theirs_prefix)}")
    limit_rate = tokens / statistics.median(run[0] for run in runs["limit (encode_batch_fast)"])
    print("| tool | wall s per round (median) | CPU s (median) | tokens/s | ratio to the limit |")
    print("|---|---|---|---|---|")
    for name, measured in runs.items():
        walls, cpus = [run[0] for run in measured], [run[1] for run in measured]
        rate = tokens / statistics.median(walls)
        print(
            f"| {name} | {' '.join(f'{w:.2f}' for w in walls)} ({statistics.median(walls):.2f}) | "
            f"{statistics.median(cpus):.2f} | {rate:,.0f} | {rate / limit_rate:.3f} |"
        )


if __name__ == "__main__":
    main()

"""Preprocessing throughput: `python -m data.preprocess text` vs Megatron-LM's tools/preprocess_data.py.

Both read the same jsonl (the quickstart corpus: stdlib source, one document per file, optionally
repeated), use the same byte-level BPE tokenizer (trained here by our preprocess, loaded by
Megatron-LM through transformers), the same number of worker processes, and append one EOD per
document. Runs alternate A B A B …; each figure is a whole process (imports included) and tokens/s
is tokens written / wall seconds. The two .bin files are compared byte for byte.

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


def write_corpus(path: pathlib.Path, repeat: int) -> int:
    from data.sources import quickstart_documents

    documents = list(quickstart_documents())
    with open(path, "w") as file:
        for _ in range(repeat):
            for text in documents:
                file.write(json.dumps({"text": text}) + "\n")
    return len(documents) * repeat


def train_tokenizer(corpus: pathlib.Path, folder: pathlib.Path, vocab_size: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data.preprocess",
            "text",
            "--input",
            str(corpus),
            "--train-tokenizer",
            str(vocab_size),
            "--output-prefix",
            str(folder / "train_corpus"),
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # transformers' AutoTokenizer (Megatron-LM's HuggingFaceTokenizer) needs the class and the EOD name
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the waited-for worker processes
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], cwd: pathlib.Path | str, env: dict[str, str]) -> tuple:
    """(wall seconds, CPU seconds of the process and its workers) of one whole run."""
    cpu, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, _children_cpu() - cpu


def tokens_in(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)  # kept alive while its memory-mapped arrays are read
    return int(indexed.sequence_lengths.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megatron-lm", required=True, help="folder with tools/preprocess_data.py")
    parser.add_argument("--extra-path", default="", help="PYTHONPATH entries Megatron-LM's script needs")
    parser.add_argument("--work", default="/tmp/bench_preprocess")
    parser.add_argument("--repeat", type=int, default=1, help="copies of the quickstart corpus in the input")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = pathlib.Path(args.work)
    (work / "tok").mkdir(parents=True, exist_ok=True)
    corpus = work / f"quickstart_x{args.repeat}.jsonl"
    documents = write_corpus(corpus, args.repeat)
    if not (work / "tok" / "tokenizer.json").exists():
        train_tokenizer(corpus, work / "tok", args.vocab_size)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ours = [
        sys.executable,
        "-m",
        "data.preprocess",
        "text",
        "--input",
        str(corpus),
        "--tokenizer",
        str(work / "tok"),
        "--workers",
        str(args.workers),
        "--output-prefix",
        str(work / "ours" / "corpus"),
    ]
    theirs = [
        sys.executable,
        "tools/preprocess_data.py",
        "--input",
        str(corpus),
        "--output-prefix",
        str(work / "megatron" / "corpus"),
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(work / "tok"),
        "--workers",
        str(args.workers),
        "--append-eod",
        "--json-keys",
        "text",
    ]
    (work / "megatron").mkdir(exist_ok=True)
    theirs_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (args.megatron_lm, args.extra_path) if p))
    times: dict[str, list[tuple]] = {"ours": [], "megatron": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        times["ours"].append(timed(ours, REPO, env))
        times["megatron"].append(timed(theirs, args.megatron_lm, theirs_env))
    ours_prefix, theirs_prefix = str(work / "ours" / "corpus"), str(work / "megatron" / "corpus_text_document")
    tokens = tokens_in(ours_prefix)
    same = pathlib.Path(ours_prefix + ".bin").read_bytes() == pathlib.Path(
        theirs_prefix + ".bin"
    ).read_bytes() and tokens == tokens_in(theirs_prefix)
    print(f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"input {corpus}: {documents} documents, {corpus.stat().st_size / 1e6:.1f} MB; {tokens} tokens; "
        f"identical .bin: {same}"
    )
    medians = {}
    for name, runs in times.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        medians[name] = statistics.median(walls), statistics.median(cpus)
        print(
            f"{name}: wall s {' '.join(f'{w:.2f}' for w in walls)}; CPU s {' '.join(f'{c:.2f}' for c in cpus)}; "
            f"median {medians[name][0]:.2f} s wall = {tokens / medians[name][0]:.0f} tokens/s, "
            f"{medians[name][1]:.2f} CPU s = {tokens / medians[name][1]:.0f} tokens per CPU s"
        )
    print(
        f"ratio ours/megatron: tokens/s {medians['megatron'][0] / medians['ours'][0]:.2f}, "
        f"tokens per CPU s {medians['megatron'][1] / medians['ours'][1]:.2f}"
    )


if __name__ == "__main__":
    main()

"""Compare training runs: a summary table on stdout and PNG plots of loss, throughput and grad norm.

    python -m tools.compare_runs RUN [RUN ...] [--out DIR] [--labels A,B,...]

Each RUN is one of
- a run directory (`logging.dir`) holding `metrics.jsonl`, as pretrain_gpt.py writes it;
- a wandb offline run (`.../wandb/offline-run-*`), a folder of them (`<logging.dir>/wandb`: a resumed
  run's parts, merged by step, later parts winning) or one `.wandb` file;
- `entity/project/run_id`, read with the wandb API (needs network and a key; only when no such path
  exists).
Plots (`--out`, default runs/compare): loss.png, throughput.png, grad_norm.png, each against step
and against consumed tokens. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import statistics
import struct
import sys

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # as common/errors.py: 128 + SIGPIPE (this script imports nothing of ours)
PLOTS = (
    ("loss", "loss", "LM loss"),
    ("throughput", "tokens_per_s", "tokens/s"),
    ("grad_norm", "grad_norm", "grad norm"),
)
_API_RUN = re.compile(r"^[\w.-]+/[\w.-]+/[\w-]+$")


class InputError(Exception):
    """A run that cannot be read; printed as one line."""


# ------------------------------------------------------------------------------------ reading runs


def read_metrics_jsonl(path: pathlib.Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {number} is not JSON: {exc.msg}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise InputError(f"{path} line {number} has no 'step'")
        records.append(record)
    return records


_WANDB_HEADER = 7  # ":W&B", magic (2 bytes), version (1 byte)
_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type, data)
_FULL, _FIRST, _LAST = 1, 2, 4


def _wandb_records(path: pathlib.Path) -> list[bytes]:
    """The serialized records of a .wandb file (fragments joined; checksums not verified)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise InputError(f"{path} is not a wandb run file (no :W&B header)")
    records, pending, pos = [], b"", _WANDB_HEADER
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # a block's tail too short for a record header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            records.append(pending)
    return records


def read_wandb_file(path: pathlib.Path) -> dict[int, dict]:
    """History rows of one .wandb file by step (`_step`), values as logged."""
    from wandb.proto import wandb_internal_pb2

    rows = {}
    for raw in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception as exc:  # protobuf's DecodeError (protobuf comes with wandb; not imported here)
            if type(exc).__name__ != "DecodeError":
                raise
            raise InputError(f"{path} holds a record that is not a wandb record: the file is damaged") from None
        if record.WhichOneof("record_type") != "history":
            continue
        row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
        if "_step" in row:
            row["step"] = int(row["_step"])
            rows[row["step"]] = row
    return rows


def read_wandb_dir(files: list[pathlib.Path]) -> list[dict]:
    """Offline parts of one run, oldest first (their folder names start with the date): a later
    part rewrites the steps it repeats, as a resumed run does."""
    rows: dict[int, dict] = {}
    for path in sorted(files, key=lambda p: p.parent.name):
        rows.update(read_wandb_file(path))
    return [rows[step] for step in sorted(rows)]


def read_api_run(path: str) -> list[dict]:
    import wandb

    try:
        run = wandb.Api().run(path)
        rows = [dict(row, step=int(row["_step"])) for row in run.scan_history()]
    except Exception as exc:  # the API raises many types (network, auth, not found): all are input errors
        raise InputError(f"cannot read wandb run '{path}': {' '.join(str(exc).split())}") from None
    return sorted(rows, key=lambda r: r["step"])


def read_run(spec: str) -> list[dict]:
    path = pathlib.Path(spec)
    if path.is_file() and path.suffix == ".wandb":
        rows = read_wandb_dir([path])
    elif path.is_dir():
        rows = _read_run_dir(path)
    elif not path.exists() and _API_RUN.match(spec):
        rows = read_api_run(spec)
    else:
        raise InputError(f"'{spec}' is not a run directory, a .wandb file or entity/project/run_id")
    if not rows:
        raise InputError(f"'{spec}' holds no logged steps")
    return rows


def _read_run_dir(path: pathlib.Path) -> list[dict]:
    if (path / "metrics.jsonl").is_file():
        return read_metrics_jsonl(path / "metrics.jsonl")
    wandb_files = (
        list(path.glob("*.wandb"))
        or list(path.glob("offline-run-*/*.wandb"))
        or list(path.glob("wandb/offline-run-*/*.wandb"))
    )
    if not wandb_files:
        raise InputError(f"'{path}' holds no metrics.jsonl and no wandb run (run-*.wandb)")
    return read_wandb_dir(wandb_files)


# ----------------------------------------------------------------------------------------- summary


def _finite(rows: list[dict], key: str) -> list[tuple]:
    """(step, value) of the rows where `key` is a finite number."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def summarize(rows: list[dict]) -> dict:
    losses = _finite(rows, "loss")
    speeds = [v for _, v in _finite(rows, "tokens_per_s")]
    mfus = [v for _, v in _finite(rows, "mfu")]
    best = min(losses, key=lambda sv: sv[1]) if losses else None
    return {
        "steps": rows[-1]["step"],
        "tokens": rows[-1].get("consumed_tokens"),
        "final_loss": rows[-1].get("loss"),
        "min_loss": best,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "skipped": sum(1 for r in rows if r.get("skipped")),
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(labels: list[str], summaries: list[dict]) -> str:
    header = ["run", "steps", "tokens", "final loss", "min loss (step)", "tokens/s (median)", "MFU (median)", "skipped"]
    lines = [header]
    for label, s in zip(labels, summaries):
        best = "-" if s["min_loss"] is None else f"{s['min_loss'][1]:.4f} ({s['min_loss'][0]})"
        mfu = "-" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
        lines.append(
            [
                label,
                str(s["steps"]),
                _cell(s["tokens"], ","),
                _cell(s["final_loss"], ".4f"),
                best,
                _cell(s["tokens_per_s"], ",.0f"),
                mfu,
                str(s["skipped"]),
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- plots


def plot(labels: list[str], runs: list[list[dict]], out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, key, title in PLOTS:
        fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(11, 4))
        for label, rows in zip(labels, runs):
            points = _finite(rows, key)
            tokens = {r["step"]: r.get("consumed_tokens") for r in rows}
            by_step.plot([s for s, _ in points], [v for _, v in points], label=label)
            with_tokens = [(tokens[s], v) for s, v in points if tokens.get(s) is not None]
            by_tokens.plot([t for t, _ in with_tokens], [v for _, v in with_tokens], label=label)
        for axis, xlabel in ((by_step, "step"), (by_tokens, "consumed tokens")):
            axis.set_xlabel(xlabel)
            axis.set_ylabel(title)
            axis.grid(alpha=0.3)
            axis.legend()
        fig.suptitle(f"{title} vs step and vs tokens")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run dirs, wandb offline runs/.wandb files, entity/project/run_id")
    parser.add_argument("--out", default="runs/compare", help="folder for the PNG plots (default runs/compare)")
    parser.add_argument("--labels", default=None, help="comma-separated names for the runs (default: folder names)")
    return parser.parse_args(argv)


def _labels(args: argparse.Namespace) -> list[str]:
    if args.labels is None:
        return [pathlib.Path(spec).name or spec for spec in args.runs]
    labels = args.labels.split(",")
    if len(labels) != len(args.runs):
        raise InputError(f"--labels names {len(labels)} runs, but {len(args.runs)} runs were given")
    return labels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        labels = _labels(args)
        runs = [read_run(spec) for spec in args.runs]
        print(table(labels, [summarize(rows) for rows in runs]))
        for path in plot(labels, runs, pathlib.Path(args.out)):
            print(f"wrote {path}")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: stop quietly; the exit flush goes to /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a path that cannot be read or written: one line, like the others
        if not exc.filename:
            raise
        print(f"error: '{exc.filename}': {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hang forensics: each rank's ring of its recent collectives and, when the watchdog fires, a report
naming the collective the waiting ranks are in and the ranks that never entered it.

While `train.watchdog_timeout_s` is set, `CollectiveRing.installed` wraps torch.distributed's
collective and point-to-point functions (the names megatron-core and this project call them by):
each call counts once per process group and leaves an entry in a small ring (op, group and its
ranks, shape, dtype, calling site). A hang freezes those counts: a member of a group whose count is
below the number a waiting rank entered never entered that collective. The ranks exchange what they
hold through the c10d store the process group was built on (`HangReport`), never through a process
group, which may be the hung one.
"""

from __future__ import annotations

import collections
import dataclasses
import faulthandler
import inspect
import json
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import torch
import torch.distributed as dist

# torch.distributed's collectives and point-to-point calls, by the name callers use.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
)
SENDS, RECEIVES = ("send", "isend"), ("recv", "irecv")
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclasses.dataclass(slots=True)
class Entry:
    """One collective call as this rank entered it."""

    seq: int  # its number among this rank's calls on `group` (1-based)
    op: str
    group: str  # the key its count is kept under: the process group's name, or "p2p SRC->DST"
    shape: tuple | None
    dtype: str | None
    site: tuple  # (file, line, function): the caller of torch.distributed, in our code or megatron-core
    step: int
    phase: str
    asynchronous: bool
    done: bool = False  # a synchronous call returned; an asynchronous one is never marked

    def describe(self, groups: dict) -> str:
        what = f"{self.op} #{self.seq} on {describe_group(self.group, groups)}"
        if self.shape is not None:
            what += f" ({self.dtype} {list(self.shape)})"
        return f"{what} at {format_site(self.site)}"


def format_site(site: tuple) -> str:
    file, line, function = site
    return f"{_short_path(file)}:{line} in {function}"


def _short_path(file: str) -> str:
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in file:
            return file.split(marker, 1)[1]
    root = str(pathlib.Path(__file__).resolve().parents[1]) + os.sep
    return file[len(root) :] if file.startswith(root) else file


def describe_group(key: str, groups: dict) -> str:
    if key.startswith("p2p "):
        return key.replace("p2p ", "point-to-point ranks ")
    info = groups.get(key, {})
    label = info.get("label") or f"group {key}"
    return f"{label} {info.get('ranks', '?')}"


class CollectiveRing:
    """This rank's recent collectives: a ring of the last `size` entries and, per group, how many it
    entered. `before_entering(op, group key)`, when set, runs before each call enters torch
    (fault injection, pretrain/faults.py)."""

    def __init__(self, rank: int, size: int = 64) -> None:
        self.rank = rank
        self.entries: collections.deque = collections.deque(maxlen=size)
        self.counts: dict[str, int] = {}
        self.groups: dict[str, dict] = {}  # key -> {"label", "ranks"}
        self.step, self.phase = 0, "start"  # set by the watchdog's phases
        self.before_entering: Callable[[str, str], None] | None = None
        self._group_keys: dict[int, str] = {}
        self._inside = threading.local()  # nested calls (all_gather_object -> all_gather) count once

    @contextmanager
    def installed(self) -> Iterator[CollectiveRing]:
        """torch.distributed's functions wrapped while the block runs; the originals after it."""
        import torch.distributed.distributed_c10d as c10d

        originals: list[tuple[Any, str, Any]] = []
        for name in (*COLLECTIVES, *SENDS, *RECEIVES):
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            wrapped = self._wrap(name, fn)
            # P2POp and batch_isend_irecv compare the op with c10d's own isend/irecv by identity.
            modules = (dist, c10d) if name in ("isend", "irecv") else (dist,)
            for module in modules:
                originals.append((module, name, getattr(module, name)))
                setattr(module, name, wrapped)
        batch = dist.batch_isend_irecv
        originals.append((dist, "batch_isend_irecv", batch))
        dist.batch_isend_irecv = self._wrap_batch(batch)
        try:
            yield self
        finally:
            for module, name, fn in reversed(originals):
                setattr(module, name, fn)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters)
        group_at = params.index("group") if "group" in params else None
        peer_name = "dst" if name in SENDS else "src" if name in RECEIVES else None
        peer_at = params.index(peer_name) if peer_name in params else None
        asynchronous = name in ("isend", "irecv")

        def collective(*args, **kwargs):
            if getattr(self._inside, "depth", 0):
                return fn(*args, **kwargs)
            group = kwargs.get("group", args[group_at] if group_at is not None and len(args) > group_at else None)
            if peer_name is None:
                key = self._group_key(group)
            else:
                peer = kwargs.get(peer_name, args[peer_at] if peer_at is not None and len(args) > peer_at else None)
                key = self._p2p_key(name, group, peer, kwargs)
            entry = self._enter(name, key, args, kwargs, asynchronous or bool(kwargs.get("async_op")))
            self._inside.depth = 1
            try:
                result = fn(*args, **kwargs)
            finally:
                self._inside.depth = 0
            entry.done = not entry.asynchronous
            return result

        collective.__wrapped__ = fn  # type: ignore[attr-defined]
        return collective

    def _wrap_batch(self, fn: Callable) -> Callable:
        def batch_isend_irecv(p2p_op_list):
            if getattr(self._inside, "depth", 0):
                return fn(p2p_op_list)
            for p2p in p2p_op_list:
                send = p2p.op is dist.isend
                key = self._p2p_key("isend" if send else "irecv", p2p.group, p2p.peer, {})
                self._enter(f"batch_isend_irecv:{'isend' if send else 'irecv'}", key, (p2p.tensor,), {}, True)
            self._inside.depth = 1
            try:
                return fn(p2p_op_list)
            finally:
                self._inside.depth = 0

        batch_isend_irecv.__wrapped__ = fn  # type: ignore[attr-defined]
        return batch_isend_irecv

    def _enter(self, op: str, key: str, args: tuple, kwargs: dict, asynchronous: bool) -> Entry:
        if self.before_entering is not None:
            self.before_entering(op, key)
        frame = sys._getframe(2)
        while frame.f_back is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back
        shape, dtype = _first_tensor(args, kwargs)
        seq = self.counts.get(key, 0) + 1
        self.counts[key] = seq
        site = (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)
        entry = Entry(seq, op, key, shape, dtype, site, self.step, self.phase, asynchronous)
        self.entries.append(entry)
        return entry

    def _group_key(self, group: Any) -> str:
        key = self._group_keys.get(id(group))
        if key is None:
            pg = group if group is not None else dist.group.WORLD
            key = str(getattr(pg, "group_name", "") or id(pg))
            ranks = dist.get_process_group_ranks(pg)
            label = getattr(pg, "group_desc", "")  # megatron-core's names, e.g. TENSOR_MODEL_PARALLEL_GROUP
            if group is None or label == "default_pg":
                label = "world"
            else:
                label = label.lower().replace("_", " ") if label and label != "undefined" else f"group {key}"
            self.groups[key] = {"label": label, "ranks": ranks}
            self._group_keys[id(group)] = key
        return key

    def _p2p_key(self, op: str, group: Any, peer: Any, kwargs: dict) -> str:
        local = kwargs.get("group_dst" if op in SENDS else "group_src")
        if peer is None and local is not None:
            peer = dist.get_global_rank(group, local)
        return f"p2p {self.rank}->{peer}" if op in SENDS else f"p2p {peer}->{self.rank}"

    def snapshot(self) -> dict:
        """What this rank tells the others: its counts, groups and recent entries."""
        entries = list(self.entries)
        return {
            "counts": dict(self.counts),
            "groups": dict(self.groups),
            "entries": [dataclasses.asdict(e) for e in entries],
        }


def _first_tensor(args: tuple, kwargs: dict) -> tuple:
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), str(value.dtype).replace("torch.", "")
    return None, None


def main_thread_site() -> str:
    """Where the main thread is now: its innermost frame outside torch and the Python library."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    fallback = None
    while frame is not None:
        file = frame.f_code.co_filename
        site = (file, frame.f_lineno, frame.f_code.co_name)
        fallback = fallback or site
        if not file.startswith(_TORCH_DIR) and not file.startswith(os.path.dirname(os.__file__)):
            return format_site(site)
        frame = frame.f_back
    return format_site(fallback) if fallback else "unknown"


class HangReport:
    """Rounds of reports over the c10d store: the first rank whose phase overruns asks for one; every
    rank's watchdog thread answers with its state and writes its block to `out_dir/rank_R.txt`;
    rank 0 waits for the answers (up to `collect_s`) and writes the summary (stderr and
    `out_dir/summary.txt`)."""

    def __init__(
        self,
        ring: CollectiveRing,
        world_size: int,
        out_dir: pathlib.Path,
        store: Any = None,
        collect_s: float = 5.0,
        stream: TextIO = sys.stderr,
    ) -> None:
        self.ring, self.world_size, self.out_dir = ring, world_size, out_dir
        self.store = store if store is not None else dist.PrefixStore("pretrain/hang/", default_store())
        self.collect_s, self.stream = collect_s, stream
        self.answered = 0
        self._entered, self._polled = 0, time.monotonic()  # collectives entered by the last poll, and when

    def overran(self, step: int, phase: str) -> None:
        """This rank's phase ran past the watchdog's timeout (first report): ask for a round, unless
        another rank already asked for this step and phase."""
        if self.store.add(f"asked/{step}/{phase}", 1) == 1:
            self.store.add("rounds", 1)

    def poll(self, state: dict) -> None:
        """Answers a round asked for since the last poll (`state`: this rank's step, phase, elapsed)."""
        entered, now = sum(self.ring.counts.values()), time.monotonic()
        recent, since = entered - self._entered, now - self._polled
        self._entered, self._polled = entered, now
        rounds = self.store.add("rounds", 0)
        if rounds <= self.answered:
            return
        self.answered = rounds
        progress = {"recent": recent, "since": since}  # a rank still entering collectives is not hung
        mine = {"rank": self.ring.rank, **state, **progress, "at": main_thread_site(), **self.ring.snapshot()}
        self.store.set(f"round/{rounds}/rank/{self.ring.rank}", json.dumps(mine))
        self._write_rank_file(mine)
        if self.ring.rank == 0:
            answers = self._collect(rounds)
            summary = summarize(answers, self.world_size)
            print(summary, file=self.stream, flush=True)
            with open(self.out_dir / "summary.txt", "a") as f:
                f.write(summary + "\n\n")

    def _collect(self, round_: int) -> dict[int, dict]:
        keys = {r: f"round/{round_}/rank/{r}" for r in range(self.world_size)}
        deadline = time.monotonic() + self.collect_s
        while not self.store.check(list(keys.values())) and time.monotonic() < deadline:
            time.sleep(0.1)
        return {r: json.loads(self.store.get(k)) for r, k in keys.items() if self.store.check([k])}

    def _write_rank_file(self, mine: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        groups = mine["groups"]
        lines = [
            f"rank {mine['rank']}: step {mine['step']} phase {mine['phase']} for {mine['elapsed']:.1f} s, "
            f"main thread at {mine['at']}",
            "collectives entered per group: "
            + ", ".join(f"{describe_group(k, groups)}: {n}" for k, n in sorted(mine["counts"].items())),
            "last collectives (oldest first):",
            *(f"  step {e['step']} {e['phase']}: {_entry(e).describe(groups)}" for e in mine["entries"][-16:]),
            "Python stacks:",
        ]
        with open(self.out_dir / f"rank_{mine['rank']}.txt", "a") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.write("\n")


def default_store() -> Any:
    """The c10d store the default process group was built on (torchrun's TCPStore)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _entry(fields: dict) -> Entry:
    return Entry(
        **{**fields, "shape": tuple(fields["shape"]) if fields["shape"] else None, "site": tuple(fields["site"])}
    )


def _waiting_in(answer: dict) -> Entry | None:
    """The collective a rank is in: its last entry, unless that one returned."""
    if not answer["entries"]:
        return None
    last = _entry(answer["entries"][-1])
    return None if last.done else last


def summarize(answers: dict[int, dict], world_size: int) -> str:
    """One readable block: who waits in which collective, who never entered it and where those are."""
    groups: dict = {}
    for answer in answers.values():
        groups.update(answer["groups"])
    lines: list[str] = []
    missing_from: dict[int, list[tuple[int, Entry]]] = {}
    progressing = [r for r, a in sorted(answers.items()) if a["recent"]]
    for rank, answer in sorted(answers.items()):
        entry = _waiting_in(answer)
        where = f"step {answer['step']} {answer['phase']}, {answer['elapsed']:.1f} s"
        if rank in progressing:
            last = f"; last: {_entry(answer['entries'][-1]).describe(groups)}" if answer["entries"] else ""
            lines.append(
                f"  rank {rank} ({where}): progressing, entered {answer['recent']} collectives in the last "
                f"{answer['since']:.1f} s{last}"
            )
            continue
        if entry is None:
            lines.append(f"  rank {rank} ({where}): in no collective, at {answer['at']}")
            continue
        members = _members(entry.group, groups)
        absent = [
            m
            for m in members
            if m in answers and answers[m]["counts"].get(entry.group, 0) < entry.seq and m not in progressing
        ]
        silent = [m for m in members if m not in answers]
        said = f"  rank {rank} ({where}): waits in {entry.describe(groups)}"
        if absent:
            said += f"; never entered it: rank{'s' if len(absent) > 1 else ''} {_ranks(absent)}"
            for m in absent:
                missing_from.setdefault(m, []).append((rank, entry))
        if silent:
            said += f"; no answer from rank{'s' if len(silent) > 1 else ''} {_ranks(silent)}"
        lines.append(said)
    unanswered = [r for r in range(world_size) if r not in answers]
    if unanswered:
        lines.append(f"  no answer from rank{'s' if len(unanswered) > 1 else ''} {_ranks(unanswered)}")
    # The cause: ranks others wait for that are not themselves waiting in a collective.
    roots = {m: v for m, v in missing_from.items() if _waiting_in(answers[m]) is None} or missing_from
    head = "watchdog: hang report"
    if roots:
        causes = []
        for m, waits in sorted(roots.items()):
            mine = answers[m]
            in_ = _waiting_in(mine)
            instead = f"waits in {in_.describe(groups)}" if in_ else f"is at {mine['at']}"
            never = ", nor ".join(
                f"{_counterpart(entry)}{entry.op} #{entry.seq} on {describe_group(entry.group, groups)}, "
                f"which rank {waiter} waits in"
                for waiter, entry in waits
            )
            causes.append(f"rank {m} never entered {never}; rank {m} {instead} (step {mine['step']} {mine['phase']})")
        head += ": " + "; ".join(causes)
    elif progressing:
        head += f": no rank is missing from a collective; rank{'s' if len(progressing) > 1 else ''} "
        head += f"{_ranks(progressing)} still enter{'' if len(progressing) > 1 else 's'} collectives (slow, not hung)"
    return "\n".join([head, *lines])


def _counterpart(entry: Entry) -> str:
    """Point to point, the rank that never entered owes the other half: "the receive matching "."""
    if not entry.group.startswith("p2p "):
        return ""
    return "the receive matching " if entry.op.split(":")[-1] in SENDS else "the send matching "


def _members(key: str, groups: dict) -> list[int]:
    if key.startswith("p2p "):
        src, dst = key[4:].split("->")
        return [int(src), int(dst)] if src != "None" and dst != "None" else []
    return list(groups.get(key, {}).get("ranks", []))


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)

"""Runs a test function on N gloo ranks (processes forked from the warm-start server, or spawned
with TESTS_WARM=0; a free port) and hands back what each rank returned, so the test can compare it
with a single-process reference it computes itself."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import warm
from tests.helpers.forkrun import exit_after, fork_ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, args: tuple, results: str) -> None:
    from upstream.process import prepare_process

    prepare_process()  # a spawned child imports this module, not conftest
    torch.set_num_threads(1)
    # a timeout turns a lost message into a failure instead of a hung test
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` gloo ranks, each with the default process group
    initialized; returns every rank's return value (tensors, numbers, lists, strings), rank order.
    An exception on any rank fails the caller with that rank's traceback. `fn` must be importable
    (a module-level function)."""
    with tempfile.TemporaryDirectory() as results:
        if not warm.ENABLED:
            mp.spawn(_rank_main, args=(fn, world_size, free_port(), args, results), nprocs=world_size, join=True)
        else:
            payload = os.path.join(results, "payload.pkl")
            with open(payload, "wb") as f:
                pickle.dump((fn, world_size, args), f)
            proc = warm.run_python(["-m", "tests.helpers.spawn", payload], timeout=600)
            if proc.returncode != 0:
                errors = [
                    open(os.path.join(results, e)).read() for e in sorted(os.listdir(results)) if e.endswith(".err")
                ]
                raise AssertionError(
                    f"exit {proc.returncode}\n" + "\n".join(errors) + proc.stdout[-3000:] + proc.stderr[-5000:]
                )
        return [torch.load(os.path.join(results, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]


def _fork_ranks(payload: str) -> int:
    """The warm-start side of run_distributed: fork the ranks of the pickled call; a rank that raises
    leaves its traceback in rank{r}.err beside the results."""
    with open(payload, "rb") as f:
        fn, world_size, args = pickle.load(f)
    results, port = os.path.dirname(payload), free_port()

    def rank_main(rank: int) -> NoReturn:
        def run() -> None:
            try:
                _rank_main(rank, fn, world_size, port, args, results)
            except BaseException:
                with open(os.path.join(results, f"rank{rank}.err"), "w") as f:
                    f.write(f"rank {rank}:\n{traceback.format_exc()}")
                raise

        exit_after(run)

    return fork_ranks(world_size, rank_main)


if __name__ == "__main__":
    sys.exit(_fork_ranks(sys.argv[1]))

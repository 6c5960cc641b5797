"""Runs a test function on N gloo ranks (spawned processes, a free port) and hands back what each
rank returned, so the test can compare it with a single-process reference it computes itself."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
        mp.spawn(_rank_main, args=(fn, world_size, free_port(), args, results), nprocs=world_size, join=True)
        return [torch.load(os.path.join(results, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]

"""`python -m tests.helpers.forkrun N pretrain_gpt.py-arguments...` (or `N -m module arguments...`
for another entry point, e.g. tools.generate): the tests' launcher for runs expected to succeed. One process imports torch, megatron-core and the trainer once, then forks the
N ranks; torchrun starts N fresh interpreters that each import them again, about 3.5 s of CPU per
rank on the 2-core CI machine, most of a tiny run's cost (a 16-rank run: a minute of imports).

The ranks see what torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and run pretrain/cli.py:main as pretrain_gpt.py does. When a rank fails
the others get SIGTERM, as under torchrun; the exit code is the first failing rank's (torchrun's
is 1), so the tests of exit codes and of the launchers themselves use torchrun and pretrain.launch.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_what_every_rank_imports() -> None:
    from upstream.process import prepare_process

    prepare_process()
    import megatron.core.distributed
    import megatron.core.models.gpt
    import megatron.core.optimizer
    import megatron.core.pipeline_parallel  # noqa: F401

    import data.loader  # noqa: F401
    import pretrain.checkpoint.storage
    import pretrain.trainer  # noqa: F401


def _rank(rank: int, nproc: int, port: int, argv: list[str]) -> NoReturn:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if argv[:1] == ["-m"]:
        exit_after(lambda: run_as_main(argv))
    from pretrain.cli import main

    exit_after(lambda: main(argv))


def run_as_main(args: list[str]) -> int:
    """`python script.py ...` or `python -m module ...` in this process: argv set, the entry run
    through runpy as __main__ (a module already imported runs as a fresh copy, as python -m does)."""
    import pathlib
    import runpy

    if args[0] == "-m":
        sys.argv = args[1:]
        sys.modules.pop(args[1], None)  # imported before: runpy would warn
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path[0] = str(pathlib.Path(args[0]).resolve().parent)
        runpy.run_path(args[0], run_name="__main__")
    return 0


def exit_after(run: Callable[[], int | None]) -> NoReturn:
    """A forked process's last act: `run()`, then os._exit with its code, SystemExit's (a message
    printed and 1, as python does), or 1 after the traceback; output flushed first. os._exit: a fork
    must not run the parent's atexit handlers."""
    code = 1
    try:
        code = run() or 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fork_ranks(nproc: int, rank_main: Callable[[int], NoReturn]) -> int:
    """`rank_main(rank)` in `nproc` forked children; when one fails the others get SIGTERM, as under
    torchrun. Returns the first failing rank's exit code (1 for a signal), 0 if none failed."""
    # fork copies this thread only: another thread's held lock would stay held in every rank
    assert threading.active_count() == 1, threading.enumerate()
    children = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            rank_main(rank)
        children[pid] = rank
    failed = 0
    while children:
        pid, status = os.wait()
        del children[pid]
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not failed:
            failed = code if code > 0 else 1
            for other in children:
                os.kill(other, signal.SIGTERM)
    return failed


def main(argv: list[str]) -> int:
    nproc, args = int(argv[0]), argv[1:]
    _import_what_every_rank_imports()
    port = _free_port()
    return fork_ranks(nproc, lambda rank: _rank(rank, nproc, port, args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

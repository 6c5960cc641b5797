"""torchrun for preemptible jobs: `python -m pretrain.launch [torchrun options] pretrain_gpt.py ...`.

Same options as torchrun (it calls torch.distributed.run), two differences:
- SIGTERM and SIGUSR1 go to the workers, which finish the step, save a checkpoint and exit with
  EXIT_PREEMPTED. Plain torchrun forwards SIGTERM too, but then exits 1 with a traceback however the
  workers ended, and dies on SIGUSR1 (Slurm's usual warning signal) without telling them.
- When every failed worker exited with the same documented code (2 bad input, 3 non-finite stop,
  75 preempted) the launcher exits with it, after the workers' own one-line message; plain torchrun
  exits 1 for any worker failure. Other failures print torchrun's report and exit 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

import psutil

from common.errors import EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USER_ERROR
from pretrain.guards import PREEMPTION_SIGNALS
from upstream.process import exit_quickly

PROPAGATED_EXIT_CODES = (EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_PREEMPTED)


def _workers() -> list:
    """This node's worker processes: the launcher's children that torchrun gave a LOCAL_RANK."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "LOCAL_RANK" in child.environ():
                found.append(child)
    return found


def _forward(signum: int, frame: FrameType | None) -> None:
    """Passes a preemption signal to the workers (torchrun starts each in its own session, so a
    signal to the launcher's process group does not reach them). Before any worker exists, the
    launcher ends as plain torchrun would."""
    workers = _workers()
    if not workers:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            worker.send_signal(signum)


def agent_signals(requested: str) -> str:
    """torchrun's `--signals-to-handle` list without SIGTERM and SIGUSR1: the agent turns the signals
    in it into its own shutdown (exit 1, a SignalException traceback); ours are left to `_forward`."""
    ours = {sig.name for sig in PREEMPTION_SIGNALS}
    names = (name.strip() for name in requested.split(","))
    return ",".join(name for name in names if name and name not in ours)


def exit_code_of(failures: dict) -> int | None:
    """The exit code the failed workers agree on when it is one of ours, else None. Workers killed
    by SIGTERM or SIGKILL do not count against it: once one worker exits, torchrun stops the
    others, which may still be tearing down after the same stop."""
    codes = {failure.exitcode for failure in failures.values()} - {-signal.SIGTERM, -signal.SIGKILL}
    if len(codes) == 1 and codes <= set(PROPAGATED_EXIT_CODES):
        return codes.pop()
    return None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    # torch's launcher writes this option (default SIGTERM,SIGINT,SIGHUP,SIGQUIT) into
    # TORCHELASTIC_SIGNALS_TO_HANDLE itself (torch/distributed/launcher/api.py, launch_agent), over
    # any value set in the environment here: the option is where SIGTERM must be left out.
    args.signals_to_handle = agent_signals(getattr(args, "signals_to_handle", ""))
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _forward)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        code = exit_code_of(e.failures)
        if code is not None:
            return code
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    exit_quickly(main())

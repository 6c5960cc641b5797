"""torchrun for preemptible jobs: `python -m pretrain.launch [torchrun options] pretrain_gpt.py ...`.

Same options as torchrun (it calls torch.distributed.run), two differences:
- SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) go to the workers, which finish the step, save a checkpoint
  and exit with EXIT_PREEMPTED (EXIT_INTERRUPTED for Ctrl-C; a second Ctrl-C stops them at once).
  Plain torchrun forwards SIGTERM and SIGINT too, but then exits 1 with a traceback however the
  workers ended (and kills them after --shutdown-timeout, 30 s, saved or not), and dies on SIGUSR1
  (Slurm's usual warning signal) without telling them.
- When every failed worker exited with the same documented code (2 bad input, 3 non-finite stop,
  4 out of memory, 75 preempted, 130 interrupted) the launcher exits with it, after the workers' own one-line
  message; plain torchrun exits 1 for any worker failure. Other failures print torchrun's report
  and exit 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from types import FrameType

import psutil

from common.errors import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OUT_OF_MEMORY, EXIT_PREEMPTED, EXIT_USER_ERROR
from pretrain.guards import STOP_SIGNALS
from upstream.process import exit_quickly

PROPAGATED_EXIT_CODES = (EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_OUT_OF_MEMORY, EXIT_PREEMPTED, EXIT_INTERRUPTED)


def _workers() -> list:
    """This node's worker processes: the launcher's children that torchrun gave a LOCAL_RANK."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "LOCAL_RANK" in child.environ():
                found.append(child)
    return found


def _forward(signum: int, frame: FrameType | None) -> None:
    """Passes a stop signal to the workers. torchrun starts each in its own session, so Ctrl-C in a
    terminal (SIGINT to the foreground process group) or a signal to the launcher's group does not
    reach them; a worker that is in the launcher's process group got it already and is left alone,
    or a single Ctrl-C would count twice there. Before any worker exists, the launcher ends as plain
    torchrun would."""
    workers = _workers()
    if not workers:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for worker in workers:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(worker.pid) != os.getpgrp():
                worker.send_signal(signum)


def agent_signals(requested: str) -> str:
    """torchrun's `--signals-to-handle` list without SIGTERM, SIGUSR1 and SIGINT: the agent turns the
    signals in it into its own shutdown (exit 1, a SignalException traceback, the workers killed
    after a timeout); ours are left to `_forward`."""
    ours = {sig.name for sig in STOP_SIGNALS}
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


class _QuietAgreedStop(logging.Filter):
    """Drops torchrun's log lines about an agreed stop: "failed (exitcode: N)" for one of our exit
    codes (the workers said why in one line) and "Sending process P closing signal SIGTERM" (the
    agent ending the workers left once one exited). Other records pass, torchrun's report with them."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg.startswith("failed (exitcode: %s)") and args and args[0] in PROPAGATED_EXIT_CODES:
            return False
        return not (record.msg.startswith("Sending process %s closing signal %s") and args[1:] == ("SIGTERM",))


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(argv)
    # torch's launcher writes this option (default SIGTERM,SIGINT,SIGHUP,SIGQUIT) into
    # TORCHELASTIC_SIGNALS_TO_HANDLE itself (torch/distributed/launcher/api.py, launch_agent), over
    # any value set in the environment here: the option is where SIGTERM must be left out.
    args.signals_to_handle = agent_signals(getattr(args, "signals_to_handle", ""))
    for sig in STOP_SIGNALS:
        signal.signal(sig, _forward)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietAgreedStop())
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

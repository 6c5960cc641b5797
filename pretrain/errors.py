"""User-facing output: one-line errors (exit code 2, no traceback unless --debug), early stops, quiet imports,
a quick exit."""

import gc
import sys
import warnings
from typing import NoReturn


class UserError(Exception):
    """Bad input from a person (recipe, override, data file, checkpoint): printed as one line, exit 2."""


class RecipeError(UserError):
    """A recipe or override that is invalid; the message names the key and, where known, the file."""


class RunStopped(Exception):
    """Training stopped early on purpose (a fault guard, a preemption signal); every rank raises it
    at the same step. Printed as one line by rank 0; the process exits with `exit_code`."""

    exit_code = 1
    label = "error"  # the printed line starts with it


def quiet_dependency_warnings() -> None:
    """megatron-core warns at import about every optional fused kernel it lacks (TE, apex): on CPU
    that is expected, and a wall of it hides the progress lines. Entry points call this."""
    for module in (r"megatron\..*", r"torch\.distributed\..*"):
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=module)
    # dist_checkpointing builds torch ShardedTensors on every save and load; torch's deprecation
    # notice is attributed to whichever frame calls it (on CPU, the device layer's function mode).
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)


def exit_quickly(code: int) -> NoReturn:
    """sys.exit(code) without the interpreter's last full garbage collection over every object torch
    and megatron-core made at import: 1.0 of the 1.2 s a process took to exit here. The objects move
    to the collector's permanent generation, which it skips; they are still freed when their modules
    are cleared, atexit hooks (wandb, multiprocessing) still run, and the OS takes back the rest.
    For entry points, once their work is done: files are written and closed by then."""
    gc.freeze()
    sys.exit(code)

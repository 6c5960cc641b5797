"""Errors meant for people and the exit codes of every entry point; imports nothing of ours."""

import os
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2  # bad input: a recipe, override, data file, checkpoint, path or tool argument
EXIT_NONFINITE = 3  # a fault guard stopped the run: non-finite loss or gradients
EXIT_OUT_OF_MEMORY = 4  # a rank ran out of device memory: the report names the cheapest change that fits
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a C tool whose reader left (`| head`)
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL, "try again later": checkpoint saved, resume with load=auto
EXIT_INTERRUPTED = 130  # the shells' 128 + SIGINT: Ctrl-C (the first one saves a checkpoint, a second stops at once)


def path_problem(exc: OSError) -> str | None:
    """ "'PATH': reason" for an OSError about a path a person gave or a run writes (missing,
    unreadable, unwritable, a file where a folder is needed, a full disk), for entry points to print
    as one line; None when it names no path (then it is a bug, with its traceback)."""
    if not exc.filename:
        return None
    names = f"'{exc.filename}'" + (f" -> '{exc.filename2}'" if exc.filename2 else "")
    return f"{names}: {exc.strerror or exc}"


def reader_gone() -> int:
    """stdout's reader went away (`tool | head -1`): stop quietly, as Unix tools do. What is still
    buffered goes nowhere (stdout now points at /dev/null, so the exit flush cannot fail again)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def run_tool(body: Callable[[], int], debug: bool, where: str = "") -> int:
    """A tool's main: bad input (a UserError, an OSError naming a path) becomes one `error:` line on
    stderr (after `where`, e.g. "[rank 3] ") and exit code 2; `debug` (the tools' --debug) lets it
    raise with its traceback. A closed stdout (`| head`) ends it quietly (`reader_gone`)."""
    try:
        code = body()
        sys.stdout.flush()  # a pipe closed early fails here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return reader_gone()
    except UserError as exc:
        if debug:
            raise
        print(f"error: {where}{exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except OSError as exc:
        problem = path_problem(exc)
        if problem is None or debug:
            raise
        print(f"error: {where}{problem}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


class UserError(Exception):
    """Bad input from a person (recipe, override, data file, checkpoint, path): printed as one line, exit 2."""


class RecipeError(UserError):
    """A recipe or override that is invalid; the message names the key and, where known, the file."""


class RunStopped(Exception):
    """Training stopped early on purpose (a fault guard, a preemption signal); every rank raises it
    at the same step. Printed as one line by rank 0; the process exits with `exit_code`."""

    exit_code = 1
    label = "error"  # the printed line starts with it


class AgreedUserError(RunStopped):
    """Bad input that every rank found at the same step, after agreeing on it (e.g. token ids beyond
    the vocabulary in one rank's batch): printed once by rank 0, exit 2."""

    exit_code = EXIT_USER_ERROR


def require_divides(divisor_name: str, divisor: int, dividend_name: str, dividend: int) -> None:
    """RecipeError unless `divisor` divides `dividend` (two recipe keys, named as the user writes them)."""
    if dividend % divisor:
        raise RecipeError(f"{divisor_name} = {divisor} does not divide {dividend_name} = {dividend}")

"""Errors meant for people and the exit codes of every entry point; imports nothing of ours."""

EXIT_USER_ERROR = 2  # bad input: a recipe, override, data file, checkpoint, path or tool argument
EXIT_NONFINITE = 3  # a fault guard stopped the run: non-finite loss or gradients
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL, "try again later": checkpoint saved, resume with load=auto


class UserError(Exception):
    """Bad input from a person (recipe, override, data file, checkpoint, path): printed as one line, exit 2."""


class RecipeError(UserError):
    """A recipe or override that is invalid; the message names the key and, where known, the file."""


class RunStopped(Exception):
    """Training stopped early on purpose (a fault guard, a preemption signal); every rank raises it
    at the same step. Printed as one line by rank 0; the process exits with `exit_code`."""

    exit_code = 1
    label = "error"  # the printed line starts with it

"""User-facing output: one-line errors (exit code 2, no traceback unless --debug), quiet imports."""

import warnings


class UserError(Exception):
    """Bad input from a person (recipe, override, data file, checkpoint): printed as one line, exit 2."""


class RecipeError(UserError):
    """A recipe or override that is invalid; the message names the key and, where known, the file."""


def quiet_dependency_warnings() -> None:
    """megatron-core warns at import about every optional fused kernel it lacks (TE, apex): on CPU
    that is expected, and a wall of it hides the progress lines. Entry points call this."""
    for module in (r"megatron\..*", r"torch\.distributed\..*"):
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=module)

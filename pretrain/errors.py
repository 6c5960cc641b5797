"""User-facing errors: one line for a person, exit code 2, no traceback unless --debug."""


class UserError(Exception):
    """Bad input from a person (recipe, override, data file, checkpoint): printed as one line, exit 2."""


class RecipeError(UserError):
    """A recipe or override that is invalid; the message names the key and, where known, the file."""

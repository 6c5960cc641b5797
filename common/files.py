"""Files a run writes again: the earlier one is set aside under a new name, never destroyed silently."""

import os
import pathlib


def set_aside(path: pathlib.Path) -> pathlib.Path:
    """Renames `path` to the first free `<stem>.replaced-K<suffix>` (a folder: `<name>.replaced-K`)
    beside it and returns the new path; the caller says so in a line."""
    k = 1
    while True:
        name = f"{path.name}.replaced-{k}" if path.is_dir() else f"{path.stem}.replaced-{k}{path.suffix}"
        kept = path.with_name(name)
        if not kept.exists():
            os.rename(path, kept)
            return kept
        k += 1

"""Switching one named upstream fix (upstream/fixes.py) off, to show its upstream site failing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def unfixed(name: str) -> Iterator[None]:
    """Upstream's own code at the site of fix `name` while the block runs (the fix, if it was
    applied, comes back after)."""
    from upstream.fixes import FIXES

    patch = FIXES.get(name)
    was_applied = patch.applied
    patch.revert()
    try:
        yield
    finally:
        if was_applied:
            patch.apply()

"""The one shape of every change we make to a dependency: a named, revertible replacement of one
attribute, with the upstream site it exists for. A `PatchSet` applies a list of them (once each),
reverts them and lists them; each patch has a site test that shows its site failing without it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_ABSENT = object()  # the attribute was not the target's own: reverting deletes ours


def _always() -> bool:
    return True


@dataclasses.dataclass
class Patch:
    """One replacement of `target.attribute`: `replacement` itself, or what `wrap` makes of the
    attribute it replaces (a fix that calls upstream's code around its own)."""

    name: str
    site: str  # upstream file and line (megatron-core 0.16.1)
    target: object  # the module or class that holds the attribute
    attribute: str
    replacement: object = None
    wrap: Callable[[Any], object] | None = None
    needed: Callable[[], bool] = _always  # False where upstream works as it is (e.g. with transformer-engine)
    applied: bool = False
    original: object = _ABSENT  # the target's own attribute before `apply`

    def apply(self) -> bool:
        """Replaces the attribute; False (and nothing changed) when applied already or not needed."""
        if self.applied or not self.needed():
            return False
        self.original = vars(self.target).get(self.attribute, _ABSENT)
        new = self.wrap(getattr(self.target, self.attribute)) if self.wrap is not None else self.replacement
        setattr(self.target, self.attribute, new)
        self.applied = True
        return True

    def revert(self) -> None:
        """Puts back the target's own attribute (deletes ours where it had none: an inherited or
        missing one comes back)."""
        if not self.applied:
            return
        if self.original is _ABSENT:
            delattr(self.target, self.attribute)
        else:
            setattr(self.target, self.attribute, self.original)
        self.original, self.applied = _ABSENT, False


class PatchSet:
    """Patches applied together; built on first use, so importing their module imports no megatron."""

    def __init__(self, build: Callable[[], list[Patch]]):
        self._build = build
        self._patches: list[Patch] | None = None

    @property
    def patches(self) -> list[Patch]:
        if self._patches is None:
            self._patches = self._build()
        return self._patches

    def names(self) -> list[str]:
        return [p.name for p in self.patches]

    def get(self, name: str) -> Patch:
        return next(p for p in self.patches if p.name == name)

    def apply(self, skip: tuple[str, ...] = ()) -> list[str]:
        """Applies each patch not in `skip`; returns the names of those that changed something."""
        return [p.name for p in self.patches if p.name not in skip and p.apply()]

    def revert(self) -> None:
        for patch in reversed(self.patches):
            patch.revert()

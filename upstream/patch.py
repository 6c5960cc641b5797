"""The one shape of a change we make to a dependency: a named, revertible replacement of an attribute,
with the upstream site it exists for."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Patch:
    """One replacement of an attribute, with the upstream site it exists for."""

    name: str
    site: str
    target: object
    attribute: str
    replacement: object
    original: object = None

    def apply(self) -> None:
        self.original = getattr(self.target, self.attribute)
        setattr(self.target, self.attribute, self.replacement)

    def revert(self) -> None:
        setattr(self.target, self.attribute, self.original)

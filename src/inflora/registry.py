"""One registry helper for every name -> object table of the package (learners, classifiers, datasets, backbones,
adapter presets): a ``dict`` that refuses silent re-registration and explains unknown names."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """Names to objects. ``add`` registers, the decorator form registers a class or function under a name, and
    ``get`` raises a ``KeyError`` naming the valid choices (the ``what`` of the table in the message)."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def add(self, name: str, value: T, *, replace: bool = False) -> T:
        """Register ``value`` under ``name``; registering another object under a taken name is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.what} names must be non-empty strings, got {name!r}")
        if name in self and self[name] is not value and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = value
        return value

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(value: T) -> T:
            return self.add(name, value, replace=replace)

        return deco

    def get(self, name: str) -> T:  # type: ignore[override]
        """The object registered under ``name``; a ``KeyError`` listing the valid names otherwise."""
        try:
            return self[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; valid: {', '.join(sorted(self)) or '(none)'}") from None

    def names(self) -> list[str]:
        return sorted(self)

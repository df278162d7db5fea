"""Continual-learning methods, one registry: ``inflora``, ``seqlora``, ``joint``, ``frozen``."""

from __future__ import annotations

from collections.abc import Callable

from .base import Learner

LEARNERS: dict[str, type[Learner]] = {}


def register_learner(name: str) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator adding a learner to the registry under ``name``."""

    def deco(cls: type[Learner]) -> type[Learner]:
        if name in LEARNERS:
            raise ValueError(f"learner {name!r} is already registered")
        cls.name = name
        LEARNERS[name] = cls
        return cls

    return deco


from . import methods  # noqa: E402,F401  (registers the built-in learners)

__all__ = ["LEARNERS", "Learner", "register_learner"]

"""Continual-learning methods behind one contract (:class:`Learner`), one registry: ``inflora``, ``seqlora``,
``joint``, ``frozen``. Register your own with :func:`register_learner`; it then runs with ``method: NAME``."""

from __future__ import annotations

from collections.abc import Callable

from ..config import register_choice
from ..registry import Registry
from .base import Learner, LearnerSetup, StepOutput, TaskContext

LEARNERS: Registry[type[Learner]] = Registry("method")


def register_learner(name: str, *, replace: bool = False) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator adding a learner to the registry under ``name``; its ``options_type`` (a dataclass with
    :func:`inflora.config.opt` fields, or None) becomes the config section ``name``."""

    def deco(cls: type[Learner]) -> type[Learner]:
        if not (isinstance(cls, type) and issubclass(cls, Learner)):
            raise TypeError(f"register_learner({name!r}) needs a Learner subclass, got {cls!r}")
        LEARNERS.add(name, cls, replace=replace)
        cls.name = name
        register_choice("method", name, cls.options_type)
        return cls

    return deco


from . import frozen, lora  # noqa: E402,F401  (registers the built-in learners)

__all__ = ["LEARNERS", "Learner", "LearnerSetup", "StepOutput", "TaskContext", "register_learner"]

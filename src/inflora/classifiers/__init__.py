"""Classifier components and their registry: ``linear`` (per-task heads, local cross-entropy) and ``aligned``
(the same heads re-aligned on class Gaussians after each task, "+CA")."""

from __future__ import annotations

from collections.abc import Callable

from ..config import register_choice
from .base import CLASSIFIERS, Classifier, ClassLayout


def register_classifier(name: str) -> Callable[[type[Classifier]], type[Classifier]]:
    """Class decorator registering a classifier (and its ``options_type`` as the config section ``name``)."""

    def deco(cls: type[Classifier]) -> type[Classifier]:
        CLASSIFIERS.add(name, cls)
        cls.name = name
        register_choice("classifier", name, cls.options_type)
        return cls

    return deco


from . import aligned, linear  # noqa: E402,F401  (registers the built-in classifiers)

__all__ = ["CLASSIFIERS", "ClassLayout", "Classifier", "register_classifier"]

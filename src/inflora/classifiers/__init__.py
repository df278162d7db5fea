"""Classifier components and their registry: ``linear`` (per-task heads, local cross-entropy) and ``aligned``
(the same heads re-aligned on class Gaussians after each task, "+CA")."""

from .aligned import AlignedHeads, AlignedOptions
from .base import CLASSIFIERS, Classifier, ClassLayout, register_classifier
from .linear import LinearHeads, LinearOptions

__all__ = ["CLASSIFIERS", "AlignedHeads", "AlignedOptions", "ClassLayout", "Classifier", "LinearHeads",
           "LinearOptions", "register_classifier"]

"""Classifier components and their registry: ``linear`` (per-task heads, local cross-entropy), ``aligned`` (the same
heads re-aligned on class Gaussians after each task, "+CA"), ``prototype`` (cosine nearest class mean) and ``ridge``
(RanPAC's random-projection ridge head)."""

from .aligned import AlignedHeads, AlignedOptions
from .base import CLASSIFIERS, Classifier, ClassLayout, register_classifier
from .linear import LinearHeads, LinearOptions
from .prototype import PrototypeClassifier, PrototypeOptions
from .ridge import RidgeClassifier, RidgeOptions
from .taskhead import CosineHead, HeadOptions

__all__ = ["CLASSIFIERS", "AlignedHeads", "AlignedOptions", "ClassLayout", "Classifier", "CosineHead", "HeadOptions",
           "LinearHeads", "LinearOptions", "PrototypeClassifier", "PrototypeOptions", "RidgeClassifier",
           "RidgeOptions", "register_classifier"]

"""``frozen``: the lower bound, a frozen backbone with only the classifier trained; ``simplecil``: a frozen backbone
and the cosine prototype classifier, nothing trained (SimpleCIL)."""

from __future__ import annotations

from .base import Learner, register_learner


@register_learner("frozen")
class FrozenLearner(Learner):
    """Lower bound: backbone frozen, classifier only (with ``classifier: aligned``, a strong frozen-feature
    baseline; with ``classifier: prototype`` it is SimpleCIL, with ``ridge`` RanPAC without its first session)."""


@register_learner("simplecil")
class SimpleCILLearner(FrozenLearner):
    """SimpleCIL (Zhou et al.): the pre-trained backbone, frozen; after each task the class means of its features
    (test transforms) become cosine prototypes; no training step at all (the prototype classifier's trained head
    does not predict, so the task has no parameter to train)."""

    own_classifier = "prototype"

"""``frozen``: the lower bound, a frozen backbone with only the classifier trained."""

from __future__ import annotations

from .base import Learner, register_learner


@register_learner("frozen")
class FrozenLearner(Learner):
    """Lower bound: backbone frozen, classifier only (with ``classifier: aligned``, a strong frozen-feature
    baseline)."""

"""Prompt-based baselines on the token seam: ``l2p``, ``dualprompt``, ``codaprompt`` (shared parts in
:mod:`.base` and :mod:`.matching`)."""

from .base import PromptLearner, PromptOptions, PullOptions
from .codaprompt import CodaPromptLearner, CodaPromptOptions
from .dualprompt import DualPromptLearner, DualPromptOptions
from .l2p import L2PLearner, L2POptions

__all__ = ["CodaPromptLearner", "CodaPromptOptions", "DualPromptLearner", "DualPromptOptions", "L2PLearner",
           "L2POptions", "PromptLearner", "PromptOptions", "PullOptions"]

"""Continual-learning methods behind one contract (:class:`Learner`), one registry: ``inflora``, ``seqlora``,
``joint``, ``frozen``, and the prompt baselines ``l2p``, ``dualprompt``, ``codaprompt``. Register your own with
:func:`register_learner`; it then runs with ``method: NAME``."""

from .base import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .frozen import FrozenLearner
from .lora import InfLoRALearner, JointLearner, SeqLoRALearner
from .prompts import CodaPromptLearner, DualPromptLearner, L2PLearner, PromptLearner

__all__ = ["LEARNERS", "CodaPromptLearner", "DualPromptLearner", "FrozenLearner", "InfLoRALearner", "JointLearner",
           "L2PLearner", "Learner", "LearnerSetup", "PromptLearner", "SeqLoRALearner", "StepOutput", "TaskContext",
           "register_learner"]

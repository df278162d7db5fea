"""Continual-learning methods behind one contract (:class:`Learner`), one registry: ``inflora``, ``seqlora``,
``joint``, ``frozen``, ``colora`` (CoLoR), ``lae`` (LAE), and the prompt baselines ``l2p``, ``dualprompt``,
``codaprompt``. Register your own with :func:`register_learner`; it then runs with ``method: NAME``."""

from .base import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .colora import CoLoRLearner, CoLoROptions
from .frozen import FrozenLearner
from .lae import LAELearner, LAEOptions
from .lora import InfLoRALearner, JointLearner, SeqLoRALearner
from .prompts import CodaPromptLearner, DualPromptLearner, L2PLearner, PromptLearner

__all__ = ["LEARNERS", "CoLoRLearner", "CoLoROptions", "CodaPromptLearner", "DualPromptLearner", "FrozenLearner",
           "InfLoRALearner", "JointLearner", "L2PLearner", "LAELearner", "LAEOptions", "Learner", "LearnerSetup",
           "PromptLearner", "SeqLoRALearner", "StepOutput", "TaskContext", "register_learner"]

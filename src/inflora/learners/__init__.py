"""Continual-learning methods behind one contract (:class:`Learner`), one registry: ``inflora``, ``seqlora``,
``joint``, ``frozen``, ``colora`` (CoLoR), ``lae`` (LAE). Register your own with :func:`register_learner`; it then
runs with ``method: NAME``."""

from .base import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .colora import CoLoRLearner, CoLoROptions
from .frozen import FrozenLearner
from .lae import LAELearner, LAEOptions
from .lora import InfLoRALearner, JointLearner, SeqLoRALearner

__all__ = ["LEARNERS", "CoLoRLearner", "CoLoROptions", "FrozenLearner", "InfLoRALearner", "JointLearner",
           "LAELearner", "LAEOptions", "Learner", "LearnerSetup", "SeqLoRALearner", "StepOutput", "TaskContext",
           "register_learner"]

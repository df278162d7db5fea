"""Continual-learning methods behind one contract (:class:`Learner`), one registry: ``inflora``, ``seqlora``,
``joint``, ``frozen``. Register your own with :func:`register_learner`; it then runs with ``method: NAME``."""

from .base import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .frozen import FrozenLearner
from .lora import InfLoRALearner, JointLearner, SeqLoRALearner

__all__ = ["LEARNERS", "FrozenLearner", "InfLoRALearner", "JointLearner", "Learner", "LearnerSetup",
           "SeqLoRALearner", "StepOutput", "TaskContext", "register_learner"]

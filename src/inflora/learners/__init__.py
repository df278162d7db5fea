"""Continual-learning methods behind one contract (:class:`Learner`), one registry: ``inflora``, ``seqlora``,
``joint``, ``frozen``, and the LoRA-family baselines ``sdlora``, ``olora``, ``clora``. Register your own with
:func:`register_learner`; it then runs with ``method: NAME``."""

from .base import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .clora import CLoRALearner
from .frozen import FrozenLearner
from .lora import InfLoRALearner, JointLearner, SeqLoRALearner
from .olora import OLoRALearner
from .sdlora import SDLoRALearner

__all__ = ["LEARNERS", "CLoRALearner", "FrozenLearner", "InfLoRALearner", "JointLearner", "Learner",
           "LearnerSetup", "OLoRALearner", "SDLoRALearner", "SeqLoRALearner", "StepOutput", "TaskContext",
           "register_learner"]

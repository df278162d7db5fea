"""Continual-learning methods behind one contract (:class:`Learner`), one registry: ``inflora``, ``seqlora``,
``joint``, ``frozen``, and the frozen-feature baselines ``simplecil``, ``aper``, ``ranpac``. Register your own with
:func:`register_learner`; it then runs with ``method: NAME``."""

from .base import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .firstsession import APERLearner, FirstSessionLearner, FirstSessionOptions, RanPACLearner, RanPACOptions
from .frozen import FrozenLearner, SimpleCILLearner
from .lora import InfLoRALearner, JointLearner, SeqLoRALearner

__all__ = ["LEARNERS", "APERLearner", "FirstSessionLearner", "FirstSessionOptions", "FrozenLearner",
           "InfLoRALearner", "JointLearner", "Learner", "LearnerSetup", "RanPACLearner", "RanPACOptions",
           "SeqLoRALearner", "SimpleCILLearner", "StepOutput", "TaskContext", "register_learner"]

"""Continual-learning methods behind one contract (:class:`Learner`), one registry: ``inflora``, ``seqlora``,
``joint``, ``frozen``, the LoRA-family baselines ``colora`` (CoLoR), ``lae`` (LAE), ``sdlora``, ``olora``,
``clora``, the frozen-feature baselines ``simplecil``, ``aper``, ``ranpac``, and the prompt baselines ``l2p``,
``dualprompt``, ``codaprompt``. Register your own with :func:`register_learner`; it then runs with
``method: NAME``."""

from .base import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .clora import CLoRALearner
from .colora import CoLoRLearner, CoLoROptions
from .firstsession import APERLearner, FirstSessionLearner, FirstSessionOptions, RanPACLearner, RanPACOptions
from .frozen import FrozenLearner, SimpleCILLearner
from .lae import LAELearner, LAEOptions
from .lora import InfLoRALearner, JointLearner, SeqLoRALearner
from .olora import OLoRALearner
from .prompts import CodaPromptLearner, DualPromptLearner, L2PLearner, PromptLearner
from .sdlora import SDLoRALearner

__all__ = ["LEARNERS", "APERLearner", "CLoRALearner", "CoLoRLearner", "CoLoROptions", "CodaPromptLearner",
           "DualPromptLearner", "FirstSessionLearner", "FirstSessionOptions", "FrozenLearner", "InfLoRALearner",
           "JointLearner", "L2PLearner", "LAELearner", "LAEOptions", "Learner", "LearnerSetup", "OLoRALearner",
           "PromptLearner", "RanPACLearner", "RanPACOptions", "SDLoRALearner", "SeqLoRALearner", "SimpleCILLearner",
           "StepOutput", "TaskContext", "register_learner"]

"""InfLoRA: interference-free low-rank adaptation for continual learning on pre-trained transformers."""

from .adapter import (
    PRESETS,
    InfLoRAAdapter,
    InfLoRAConfig,
    InputStats,
    LoRALinear,
    StatsCollector,
    SubspaceMemory,
    attach,
    collect_input_stats,
    design_down,
)
from .classifiers import CLASSIFIERS, Classifier, ClassLayout, register_classifier
from .learners import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .version import __version__

__all__ = [
    "CLASSIFIERS",
    "LEARNERS",
    "PRESETS",
    "ClassLayout",
    "Classifier",
    "InfLoRAAdapter",
    "InfLoRAConfig",
    "InputStats",
    "Learner",
    "LearnerSetup",
    "LoRALinear",
    "StatsCollector",
    "StepOutput",
    "SubspaceMemory",
    "TaskContext",
    "__version__",
    "attach",
    "collect_input_stats",
    "design_down",
    "register_classifier",
    "register_learner",
]

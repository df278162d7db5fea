"""InfLoRA: interference-free low-rank adaptation for continual learning on pre-trained transformers."""

from .adapter import (
    PRESETS,
    EnergyMeter,
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
from .drift import FeatureProbe, relative_drift
from .learners import LEARNERS, Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .version import __version__

__all__ = [
    "CLASSIFIERS",
    "LEARNERS",
    "PRESETS",
    "ClassLayout",
    "Classifier",
    "EnergyMeter",
    "FeatureProbe",
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
    "relative_drift",
]

"""InfLoRA: interference-free low-rank adaptation for continual learning on pre-trained transformers."""

from .adapter import (
    PRESETS,
    InfLoRAAdapter,
    InfLoRAConfig,
    InputStats,
    LoRALinear,
    SubspaceMemory,
    attach,
    collect_input_stats,
    design_down,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "InfLoRAAdapter",
    "InfLoRAConfig",
    "InputStats",
    "LoRALinear",
    "SubspaceMemory",
    "__version__",
    "attach",
    "collect_input_stats",
    "design_down",
]

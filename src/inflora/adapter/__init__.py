"""The InfLoRA adapter: attach to a model, collect statistics, design branches, keep the subspace memory."""

from .adapter import InfLoRAAdapter, InfLoRAConfig, Site, attach
from .design import design_down
from .layers import LoRALinear
from .memory import SubspaceMemory, threshold
from .stats import InputStats, collect_input_stats
from .targets import PRESETS, Preset, find_sites, register_preset

__all__ = [
    "PRESETS",
    "InfLoRAAdapter",
    "InfLoRAConfig",
    "InputStats",
    "LoRALinear",
    "Preset",
    "Site",
    "SubspaceMemory",
    "attach",
    "collect_input_stats",
    "design_down",
    "find_sites",
    "register_preset",
    "threshold",
]

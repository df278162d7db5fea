"""The InfLoRA adapter: attach to a model, collect statistics, design branches, keep the subspace memory; the
energy meter (the share of old tasks' input energy outside the memory)."""

from ..lora import LoRABranch, LoRALinear
from .adapter import InfLoRAAdapter, Site, attach
from .design import design_down
from .memory import SubspaceMemory, threshold
from .meter import EnergyMeter, energy_factor, energy_outside
from .options import DesignOptions, InfLoRAConfig, RankOptions, TargetOptions
from .stats import InputStats, StatsCollector, collect_input_stats
from .targets import PRESETS, Preset, find_sites, register_preset

__all__ = [
    "PRESETS",
    "DesignOptions",
    "EnergyMeter",
    "InfLoRAAdapter",
    "InfLoRAConfig",
    "InputStats",
    "LoRABranch",
    "LoRALinear",
    "Preset",
    "RankOptions",
    "Site",
    "StatsCollector",
    "SubspaceMemory",
    "TargetOptions",
    "attach",
    "collect_input_stats",
    "design_down",
    "energy_factor",
    "energy_outside",
    "find_sites",
    "register_preset",
    "threshold",
]

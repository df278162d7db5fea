"""A site: a group of adapted layers that read one input and share one memory and one designed down-projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora import LoRALinear
from .memory import SubspaceMemory


@dataclass
class Site:
    """A group of adapted layers sharing one input: its memory and its designed down-projections."""

    name: str
    layers: list[tuple[str, LoRALinear]]
    dim: int
    block: int | None
    memory: SubspaceMemory
    downs: list[torch.Tensor]

    @property
    def stats_layer(self) -> LoRALinear:
        return self.layers[0][1]

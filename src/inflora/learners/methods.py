"""The built-in learners: InfLoRA, SeqLoRA, joint training (upper bound), frozen backbone (lower bound)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapter import InfLoRAAdapter, InfLoRAConfig, attach, collect_input_stats
from ..backbones import Backbone
from ..config import RunConfig
from . import register_learner
from .base import Learner, StatsLoader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AdapterLearner(Learner):
    """A learner that trains per-task low-rank branches on the backbone's key/value layers."""

    adapter_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: Backbone, config: RunConfig, num_tasks: int, device: torch.device,
                 shared_head: bool = False) -> None:
        super().__init__(backbone, config, num_tasks, device, shared_head)
        a = config.adapter
        options = {"rank": a.rank, "lamb": a.lamb, "lame": a.lame, "num_tasks": num_tasks, "memory": a.memory,
                   "energy": a.energy, "projection": a.projection, "design": a.design, **self.adapter_options}
        preset = None if a.targets else (a.preset or backbone.adapter_preset)
        self.adapter: InfLoRAAdapter = attach(self.backbone, preset, targets=a.targets, blocks=a.blocks,
                                              config=InfLoRAConfig(**options))
        self.adapter.generator = torch.Generator()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return self.adapter.trainable_parameters()

    def _stats(self, loader: StatsLoader) -> tuple[Any, float]:
        _sync(self.device)
        start = time.perf_counter()
        amp = self.config.train.amp and self.device.type == "cuda"
        stats = collect_input_stats(self.backbone, self.adapter, loader(), autocast=amp)
        _sync(self.device)
        return stats, time.perf_counter() - start

    def begin_task(self, task: int, num_classes: int, stats_loader: StatsLoader) -> dict[str, float]:
        super().begin_task(task, num_classes, stats_loader)
        assert self.adapter.generator is not None
        self.adapter.generator.manual_seed(self.config.seed * 1_000_003 + task)  # random designs replay per task
        needs_stats = self.adapter.config.design in ("inflora", "new-task")
        stats, stats_s = self._stats(stats_loader) if needs_stats else (None, 0.0)
        start = time.perf_counter()
        self.adapter.begin_task(stats)
        _sync(self.device)
        return {"stats_s": stats_s, "design_s": time.perf_counter() - start}

    def end_task(self, task: int, stats_loader: StatsLoader) -> dict[str, float]:
        stats, stats_s = self._stats(stats_loader) if self.adapter.config.update_memory else (None, 0.0)
        start = time.perf_counter()
        self.adapter.end_task(stats)
        _sync(self.device)
        return {"stats_s": stats_s, "memory_s": time.perf_counter() - start}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})


@register_learner("inflora")
class InfLoRALearner(AdapterLearner):
    """InfLoRA: designed, frozen down-projections outside the old tasks' input spaces; only U_t trains."""


@register_learner("seqlora")
class SeqLoRALearner(AdapterLearner):
    """SeqLoRA: plain LoRA on the same layers (random D, both factors trained, no memory), merged after each task."""

    adapter_options: ClassVar[dict[str, Any]] = {"design": "random", "train_down": True, "update_memory": False}


@register_learner("joint")
class JointLearner(AdapterLearner):
    """Upper bound: plain LoRA trained on all data seen so far, cross-entropy over all seen classes."""

    adapter_options: ClassVar[dict[str, Any]] = {"design": "random", "train_down": True, "update_memory": False}
    replays_past = True
    global_loss = True


@register_learner("frozen")
class FrozenLearner(Learner):
    """Lower bound: backbone frozen, heads only."""

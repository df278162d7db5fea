"""The learner interface: what a continual-learning method does around the shared training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones import Backbone
from ..batches import call_model
from ..config import RunConfig
from ..heads import TaskHeads

StatsLoader = Callable[[], Iterable[Any]]


class Learner:
    """Base learner: a backbone and per-task heads; trains the current head with local cross-entropy.

    Subclasses say which backbone parameters train (``adapter_parameters``), what happens before and after each
    task (``begin_task``/``end_task``), whether training sees past data (``replays_past``) and whether the loss
    covers all seen heads (``global_loss``).
    """

    name: ClassVar[str] = "base"
    replays_past: ClassVar[bool] = False
    global_loss: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, config: RunConfig, num_tasks: int, device: torch.device,
                 shared_head: bool = False) -> None:
        self.backbone = backbone.to(device)
        self.config = config
        self.num_tasks = num_tasks
        self.device = device
        self.shared_head = shared_head  # domain-incremental: one head over the whole label space
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.heads = TaskHeads(backbone.feature_dim, device)

    # ------------------------------------------------------------------------------------------ hooks
    def begin_task(self, task: int, num_classes: int, stats_loader: StatsLoader) -> dict[str, float]:
        """Prepare task ``task``: add its head. Returns timings (seconds) of method-specific work."""
        if not self.shared_head or len(self.heads) == 0:
            self.heads.add(num_classes)
        return {}

    def end_task(self, task: int, stats_loader: StatsLoader) -> dict[str, float]:
        """Finish task ``task`` (memory updates, merges). Returns timings."""
        return {}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Backbone-side parameters trained in the current task."""
        return []

    def head_parameters(self, task: int) -> list[nn.Parameter]:
        """Head parameters trained in task ``task``: the current head (all heads for a global loss)."""
        if self.shared_head or self.global_loss:
            return list(self.heads.parameters())
        return list(self.heads.heads[task].parameters())

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Method state beyond backbone weights and heads (e.g. the adapter), as tensors."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`extra_state`."""

    # ------------------------------------------------------------------------------------------ compute
    @property
    def trains_backbone(self) -> bool:
        return bool(self.adapter_parameters())

    def features(self, inputs: Any) -> torch.Tensor:
        return call_model(self.backbone, inputs)

    def training_loss(self, features: torch.Tensor, labels: torch.Tensor, task: int) -> torch.Tensor:
        """Cross-entropy: over the current head's logits with labels shifted to it ("local"), or over all seen
        classes' logits (``train.loss=seen``, the joint learner, a shared domain head). Which heads *train* is
        :meth:`head_parameters`' business: with ``seen`` the old heads stay frozen."""
        if self.shared_head or self.global_loss or self.config.train.loss == "seen":
            return nn.functional.cross_entropy(self.heads(features, upto=task if not self.shared_head else 0),
                                               labels)
        offset = self.heads.offsets[task]
        return nn.functional.cross_entropy(self.heads.task_logits(features, task), labels - offset)

    def logits(self, features: torch.Tensor, upto: int) -> torch.Tensor:
        """Test-time logits over all classes seen after task ``upto`` (no task identity)."""
        return self.heads(features, upto=0 if self.shared_head else upto)

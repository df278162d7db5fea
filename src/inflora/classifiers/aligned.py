"""``aligned``: per-task linear heads re-aligned after every task on samples of stored class Gaussians ("+CA",
after SLCA, as the InfLoRA reference's ``inflora_ca``). No input is kept: per class only the feature sum, the
outer-product sum and the count (float64)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..alignment import ClassStatistics, align_linear
from ..config import opt
from ..distributed import all_reduce_sum, world_size
from ..runtime import Purpose, derive_seed
from .base import ClassLayout, register_classifier
from .linear import LinearHeads, LinearOptions


@dataclass
class AlignedOptions(LinearOptions):
    """Options of the aligned heads: the linear heads' plus the alignment's."""

    epochs: int = opt(5, "alignment epochs")
    lr: float = opt(0.01, "alignment SGD learning rate (cosine schedule)")
    momentum: float = opt(0.9, "alignment SGD momentum")
    weight_decay: float = opt(5e-4, "alignment weight decay")
    samples_per_class: int = opt(256, "samples drawn per seen class each epoch")
    batch_size: int = opt(256, "alignment batch size")
    shrink: float = opt(1e-4, "added to the covariance diagonal")
    logit_norm: float | None = opt(None, "logit normalisation temperature (0.1 on ImageNet-R and DomainNet; None: off)")
    mean_scale: bool = opt(True, "sample around s_c * mean_c with s_c = 0.9 + 0.1 (t_c + 1) / (t + 1), as the "
                                 "reference (t_c: the last task that gave class c data)")

    def validate(self) -> None:
        for key in ("epochs", "samples_per_class", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.logit_norm is not None and not self.logit_norm > 0:
            raise ValueError(f"logit_norm must be > 0 or null, got {self.logit_norm}")


@register_classifier("aligned")
class AlignedHeads(LinearHeads):
    """Linear heads plus classifier alignment: :meth:`observe` accumulates each class's feature moments from the
    task's training data (test transforms), :meth:`end_task` re-trains heads ``0..t`` on Gaussian samples."""

    options_type = AlignedOptions
    needs_features = True

    def __init__(self, feature_dim: int, layout: ClassLayout, options: AlignedOptions | None,
                 device: torch.device) -> None:
        super().__init__(feature_dim, layout, options or AlignedOptions(), device)
        self.stats = ClassStatistics(feature_dim, device)
        self._shard: ClassStatistics | None = None

    def observe(self, features: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        if world_size() > 1:  # this rank's share; summed over ranks in end_task
            if self._shard is None:
                self._shard = ClassStatistics(self.feature_dim, self.device)
            self._shard.add(features, labels, task)
        else:
            self.stats.add(features, labels, task)

    def _reduce_shard(self, classes: list[int], task: int) -> None:
        """Sum every rank's statistics of ``classes`` into ``self.stats``."""
        shard = self._shard or ClassStatistics(self.feature_dim, self.device)
        self._shard = None
        d = shard.dim
        packed = torch.zeros(len(classes), 1 + d + d * d, dtype=torch.float64, device=self.device)
        for row, c in zip(packed, classes, strict=True):
            if c in shard.counts:
                row[0] = shard.counts[c]
                row[1 : 1 + d] = shard.sums[c]
                row[1 + d :] = shard.outer[c].flatten()
        all_reduce_sum(packed)
        for row, c in zip(packed, classes, strict=True):
            if row[0] > 0:
                self.stats.add_moments(c, int(row[0]), row[1 : 1 + d], row[1 + d :].reshape(d, d), task)

    def end_task(self, task: int, seed: int) -> dict[str, Any]:
        start = time.perf_counter()
        layout = self.layout
        if world_size() > 1:
            first = layout.offset(task)
            self._reduce_shard(list(range(first, first + layout.task_sizes[task])), task)
        if task == 0 and layout.kind == "class":
            return {}
        classes = [c for c in range(layout.seen(task)) if c in self.stats.counts]
        generator = torch.Generator().manual_seed(derive_seed(seed, task, Purpose.ALIGN))
        weight, bias = self.stacked(task)
        weight, bias, loss = align_linear(weight, bias, layout.groups(task), self.stats, classes, task,
                                          self.options, generator)
        self.write_stacked(weight, bias, task)
        return {"align_s": time.perf_counter() - start, "align_loss": loss}

    def estimate_state_bytes(self) -> int:
        """The heads plus every class's float64 moments (sum, outer-product sum, count)."""
        d = self.feature_dim
        return super().estimate_state_bytes() + 8 * (d * d + d + 1) * self.layout.num_classes

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = super().state_tensors()
        state.update({f"class_stats.{k}": v for k, v in self.stats.state_dict().items()})
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors({k: v for k, v in state.items() if not k.startswith("class_stats.")})
        self.stats.load_state_dict({k[len("class_stats."):]: v for k, v in state.items()
                                    if k.startswith("class_stats.")})

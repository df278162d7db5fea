"""Per-task linear classifier heads whose logits concatenate over all seen classes."""

from __future__ import annotations

import torch
from torch import nn


class TaskHeads(nn.Module):
    """One ``nn.Linear(feature_dim, classes_of_task)`` per task; global class ``c`` of task ``t`` is logit
    ``offsets[t] + local index``. Class order is the scenario's, so logits line up with global labels."""

    def __init__(self, feature_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.device = torch.device(device) if device is not None else None
        self.heads = nn.ModuleList()
        self.sizes: list[int] = []

    def add(self, num_classes: int) -> nn.Linear:
        """Append a head for a new task (PyTorch's default initialisation, with bias)."""
        device = self.heads[0].weight.device if len(self.heads) else self.device
        head = nn.Linear(self.feature_dim, num_classes, device=device)
        self.heads.append(head)
        self.sizes.append(int(num_classes))
        return head

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for size in self.sizes:
            out.append(total)
            total += size
        return out

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.heads)

    def task_logits(self, features: torch.Tensor, task: int) -> torch.Tensor:
        """Logits of one task's head only."""
        return self.heads[task](features)

    def forward(self, features: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Concatenated logits of heads ``0..upto`` (default: all)."""
        last = len(self.heads) - 1 if upto is None else upto
        return torch.cat([self.heads[t](features) for t in range(last + 1)], dim=-1)

    def task_of_class(self) -> torch.Tensor:
        """Task index of every global class (long tensor of length ``num_classes``)."""
        return torch.cat([torch.full((s,), t, dtype=torch.long) for t, s in enumerate(self.sizes)])

    def per_task_norm(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over tasks of each sample's per-task logit L2 norm (for logit normalisation)."""
        chunks = torch.split(logits, self.sizes[: self._heads_in(logits)], dim=-1)
        return torch.stack([c.norm(dim=-1) for c in chunks]).mean(0)

    def _heads_in(self, logits: torch.Tensor) -> int:
        total, count = 0, 0
        for size in self.sizes:
            if total >= logits.shape[-1]:
                break
            total += size
            count += 1
        return count

"""``linear``: one linear head per task (one shared head for domains), trained with local cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import opt
from .base import Classifier, ClassLayout, register_classifier


@dataclass
class LinearOptions:
    """Options of the per-task linear heads."""

    loss: Literal["local", "seen"] = opt("local", "cross-entropy over the current head only (local, the reference) "
                                                  "or over all seen classes' logits with old heads frozen (seen)")


@register_classifier("linear")
class LinearHeads(Classifier):
    """``nn.Linear(feature_dim, classes of task t)`` per task (PyTorch's default initialisation, with bias); global
    class ``c`` of task ``t`` is logit ``offset(t) + local index``, so logits line up with global labels. A domain
    layout has one head over the whole label space, created with the first task and trained in every task."""

    options_type = LinearOptions

    def __init__(self, feature_dim: int, layout: ClassLayout, options: LinearOptions | None,
                 device: torch.device) -> None:
        super().__init__(feature_dim, layout, options or LinearOptions(), device)
        self.heads = nn.ModuleList()

    @property
    def sizes(self) -> list[int]:
        return [h.out_features for h in self.heads]

    def add_head(self, num_classes: int) -> nn.Linear:
        head = nn.Linear(self.feature_dim, num_classes, device=self.device)
        head.requires_grad_(False)
        self.heads.append(head)
        return head

    def begin_task(self, task: int) -> None:
        if self.layout.kind == "class":
            if task != len(self.heads):
                raise RuntimeError(f"task {task} begins but {len(self.heads)} heads exist")
            self.add_head(self.layout.task_sizes[task])
        elif not self.heads:
            self.add_head(self.layout.num_classes)

    def _head(self, task: int) -> nn.Linear:
        return self.heads[0 if self.layout.kind == "domain" else task]  # type: ignore[return-value]

    def parameters_for(self, task: int, all_seen: bool = False) -> list[nn.Parameter]:
        if all_seen and self.layout.kind == "class":
            return [p for h in self.heads[: task + 1] for p in h.parameters()]
        return list(self._head(task).parameters())

    def loss(self, features: torch.Tensor, labels: torch.Tensor, task: int, all_seen: bool = False) -> torch.Tensor:
        if self.layout.kind == "domain" or all_seen or self.options.loss == "seen":
            return nn.functional.cross_entropy(self.logits(features, task), labels)
        offset = self.layout.offset(task)
        return nn.functional.cross_entropy(self.heads[task](features), labels - offset)

    def logits(self, features: torch.Tensor, upto: int) -> torch.Tensor:
        if self.layout.kind == "domain":
            return self.heads[0](features)
        return torch.cat([self.heads[t](features) for t in range(upto + 1)], dim=-1)

    @torch.no_grad()
    def stacked(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights and biases of the heads seen after task ``upto`` stacked in class order (copies)."""
        heads = [self.heads[0]] if self.layout.kind == "domain" else list(self.heads[: upto + 1])
        return (torch.cat([h.weight for h in heads]).clone(), torch.cat([h.bias for h in heads]).clone())

    @torch.no_grad()
    def write_stacked(self, weight: torch.Tensor, bias: torch.Tensor, upto: int) -> None:
        """Inverse of :meth:`stacked`: split and copy into the heads."""
        heads = [self.heads[0]] if self.layout.kind == "domain" else list(self.heads[: upto + 1])
        sizes = [h.out_features for h in heads]
        for h, w, b in zip(heads, torch.split(weight, sizes), torch.split(bias, sizes), strict=True):
            h.weight.copy_(w)
            h.bias.copy_(b)

    def export_linear(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.stacked(upto)
        return weight.float().cpu().contiguous(), bias.float().cpu().contiguous()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"heads.{k}": v.detach().cpu() for k, v in self.heads.state_dict().items()}
        state["head_sizes"] = torch.tensor(self.sizes, dtype=torch.long)
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if "head_sizes" not in state:
            raise ValueError("classifier state has no head_sizes")
        if self.heads:
            raise RuntimeError("load the classifier state into a fresh classifier (no heads yet)")
        for size in state["head_sizes"].tolist():
            self.add_head(int(size))
        self.heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
        self.heads.requires_grad_(False)

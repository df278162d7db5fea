"""A cosine head for training only: the loss of a task's training steps when test-time logits come from elsewhere.

The ``prototype`` and ``ridge`` classifiers predict from statistics of observed features; a learner that adapts its
backbone with them (``inflora`` + ``prototype``) still needs a loss: the classifier's temporary :class:`CosineHead`
over the current task's classes gives it (as APER and RanPAC train their cosine head in the first session). APER's
and RanPAC's first-session learners train one too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import opt
from .base import ClassLayout


class CosineHead(nn.Module):
    """``logits = s * cos(f, w_c)`` over ``classes`` classes; the weights ``w`` and the scale ``s`` are learnt.

    Initialisation as the references' ``CosineLinear``: ``w ~ U(-1/sqrt(d), 1/sqrt(d))`` (the current torch RNG),
    ``s = scale``.
    """

    def __init__(self, dim: int, classes: int, scale: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(classes, dim, device=device).uniform_(-bound, bound))
        self.scale = nn.Parameter(torch.tensor(float(scale), device=device))

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))


def head_span(layout: ClassLayout, task: int, all_seen: bool = False) -> tuple[int, int]:
    """Global classes ``[first, stop)`` a training head of task ``task`` covers: the task's own classes, every seen
    class with ``all_seen`` (learners that replay), the whole label space in a domain layout."""
    if layout.kind == "domain":
        return 0, layout.num_classes
    stop = layout.seen(task)
    return (0 if all_seen else layout.offset(task)), stop


def head_loss(head: CosineHead | None, first: int, features: torch.Tensor, labels: torch.Tensor,
              owner: str) -> torch.Tensor:
    """Cross-entropy of ``head`` (covering global classes from ``first``) on a batch with global labels."""
    if head is None:
        raise RuntimeError(f"{owner}: no training head: the task has not begun (begin_task)")
    local = labels - first
    if bool(((local < 0) | (local >= head.classes)).any()):
        raise ValueError(f"{owner}: labels {sorted(set(labels.tolist()))} lie outside the training head's classes "
                         f"{first}..{first + head.classes - 1}")
    return F.cross_entropy(head(features), local)


@dataclass
class HeadOptions:
    """Options of a temporary training head."""

    head_scale: float = opt(16.0, "initial value of the learnt scale s of the cosine training head (logits = s * "
                                  "cos); the references start at 1, which keeps the logits within +-1 at first")

    def validate(self) -> None:
        if not (self.head_scale > 0 and math.isfinite(self.head_scale)):
            raise ValueError(f"head_scale must be a finite number > 0, got {self.head_scale}")

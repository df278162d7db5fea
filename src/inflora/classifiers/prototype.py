"""``prototype``: nearest class mean with cosine similarity (SimpleCIL's and APER's classifier).

After each task the class prototypes are the means of the task's training features (test transforms, float64
sums and counts); test-time logits are ``scale * cos(f, p_c)`` over the seen classes. Old prototypes never change
in a class-incremental run (a task only brings its own classes); in a domain-incremental run every task brings
every class, and a class's sums keep accumulating over domains. Nothing of the prototypes is trained: a learner
that adapts its backbone with this classifier trains against a temporary cosine head of the current task
(:class:`~inflora.classifiers.taskhead.CosineHead`), dropped when the task ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import opt
from ..distributed import all_reduce_sum
from .base import Classifier, ClassLayout, register_classifier
from .taskhead import CosineHead, HeadOptions, head_loss, head_span


@dataclass
class PrototypeOptions(HeadOptions):
    """Options of the cosine nearest-class-mean classifier."""

    scale: float = opt(1.0, "multiplier of the test-time cosine logits (a temperature; accuracy does not depend on "
                            "it, exported logits and probabilities do)")

    def validate(self) -> None:
        super().validate()
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale}")


@register_classifier("prototype")
class PrototypeClassifier(Classifier):
    """Cosine similarity to the class means of observed features; classes without any observed sample get the
    logit ``-inf`` (they cannot be predicted)."""

    options_type = PrototypeOptions
    needs_features = True
    trained_for_prediction = False

    def __init__(self, feature_dim: int, layout: ClassLayout, options: PrototypeOptions | None,
                 device: torch.device) -> None:
        super().__init__(feature_dim, layout, options or PrototypeOptions(), device)
        classes = layout.num_classes
        self.register_buffer("sums", torch.zeros(classes, feature_dim, dtype=torch.float64, device=device))
        self.register_buffer("counts", torch.zeros(classes, dtype=torch.float64, device=device))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.head: CosineHead | None = None
        self.head_first = 0

    # ------------------------------------------------------------------------------------------ training head
    def begin_task(self, task: int) -> None:
        self._new_head(task, all_seen=False)

    def _new_head(self, task: int, all_seen: bool) -> None:
        first, stop = head_span(self.layout, task, all_seen)
        self.head = CosineHead(self.feature_dim, stop - first, self.options.head_scale, self.device)
        self.head_first = first

    def parameters_for(self, task: int, all_seen: bool = False) -> list[nn.Parameter]:
        """The temporary cosine head of the task (over every seen class with ``all_seen``)."""
        first, stop = head_span(self.layout, task, all_seen)
        if self.head is None or (self.head_first, self.head_first + self.head.classes) != (first, stop):
            self._new_head(task, all_seen)
        assert self.head is not None
        return list(self.head.parameters())

    def loss(self, features: torch.Tensor, labels: torch.Tensor, task: int, all_seen: bool = False) -> torch.Tensor:
        """Cross-entropy of the temporary cosine head (the prototypes are not trained)."""
        return head_loss(self.head, self.head_first, features, labels, "prototype")

    # ------------------------------------------------------------------------------------------ prototypes
    def observe(self, features: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        """Add a batch of task ``task``'s training features to its classes' sums and counts (float64)."""
        first, stop = head_span(self.layout, task)
        if bool(((labels < first) | (labels >= stop)).any()):
            raise ValueError(f"prototype: task {task} observes labels outside its classes {first}..{stop - 1}: "
                             "old prototypes never change")
        if self._pending is None:
            self._pending = (torch.zeros_like(self.sums), torch.zeros_like(self.counts))
        sums, counts = self._pending
        labels = labels.to(self.device)
        sums.index_add_(0, labels, features.detach().to(self.device, torch.float64))
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def end_task(self, task: int, seed: int) -> dict[str, Any]:
        """Add the task's sums (summed over ranks) to the class sums; drop the training head."""
        sums, counts = self._pending or (torch.zeros_like(self.sums), torch.zeros_like(self.counts))
        self._pending = None
        self.sums += all_reduce_sum(sums)
        self.counts += all_reduce_sum(counts)
        self.head = None
        seen = self.layout.seen(task)
        return {"prototype_classes": int((self.counts[:seen] > 0).sum())}

    def prototypes(self, upto: int) -> torch.Tensor:
        """Class means of the classes seen after task ``upto`` (float64; zero rows for classes without data)."""
        seen = self.layout.seen(upto)
        return self.sums[:seen] / self.counts[:seen].clamp(min=1)[:, None]

    def _empty_bias(self, upto: int) -> torch.Tensor:
        """0 for classes with prototypes, ``-inf`` for classes without any observed sample."""
        seen = self.layout.seen(upto)
        return torch.zeros(seen, device=self.device).masked_fill(self.counts[:seen] == 0, float("-inf"))

    def logits(self, features: torch.Tensor, upto: int) -> torch.Tensor:
        directions = F.normalize(self.prototypes(upto), dim=-1).float()
        cosine = F.linear(F.normalize(features.float(), dim=-1), directions)
        return self.options.scale * cosine + self._empty_bias(upto)

    def export_linear(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale * p_c / |p_c|`` as the weight: one linear layer when the features arrive L2-normalised."""
        if not self.unit_features:
            raise NotImplementedError("prototype logits are cosines, which divide by each feature's norm: not one "
                                      "linear layer on an unnormalised feature (a text backbone built with "
                                      "model.options={normalize: true} exports)")
        weight = self.options.scale * F.normalize(self.prototypes(upto), dim=-1)
        return weight.float().cpu().contiguous(), self._empty_bias(upto).cpu().contiguous()

    # ------------------------------------------------------------------------------------------ state
    def estimate_state_bytes(self) -> int:
        return 8 * (self.feature_dim + 1) * self.layout.num_classes

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.detach().cpu().clone(), "counts": self.counts.detach().cpu().clone()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("sums", "counts"):
            if key not in state:
                raise ValueError(f"prototype classifier state has no {key!r}")
            if tuple(state[key].shape) != tuple(getattr(self, key).shape):
                raise ValueError(f"prototype state {key!r} has shape {tuple(state[key].shape)}, this run needs "
                                 f"{tuple(getattr(self, key).shape)}")
            getattr(self, key).copy_(state[key])

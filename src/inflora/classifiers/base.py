"""The classifier contract: a component that owns the class layout, the heads, their loss and their logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..config import register_choice
from ..registry import Registry


@dataclass(frozen=True)
class ClassLayout:
    """How global labels are laid out over tasks.

    ``class``: task ``t`` brings ``task_sizes[t]`` new classes, a contiguous block of the label space.
    ``domain``: every task brings the same ``num_classes`` classes (one shared label space).
    """

    kind: Literal["class", "domain"]
    task_sizes: tuple[int, ...]

    @classmethod
    def create(cls, kind: str, task_sizes: Sequence[int]) -> ClassLayout:
        if kind not in ("class", "domain"):
            raise ValueError(f"layout kind must be class or domain, got {kind!r}")
        return cls(kind, tuple(int(s) for s in task_sizes))  # type: ignore[arg-type]

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return self.task_sizes[0] if self.kind == "domain" else sum(self.task_sizes)

    def offset(self, task: int) -> int:
        """First global label of task ``task`` (0 for every domain)."""
        return 0 if self.kind == "domain" else sum(self.task_sizes[:task])

    def seen(self, upto: int) -> int:
        """Number of classes seen once task ``upto`` is learnt."""
        return self.num_classes if self.kind == "domain" else sum(self.task_sizes[: upto + 1])

    def groups(self, upto: int) -> list[int]:
        """Logit groups after task ``upto`` (one per task's head; one group for domains)."""
        return [self.num_classes] if self.kind == "domain" else list(self.task_sizes[: upto + 1])

    def task_of_class(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Task of every global class (class layout) as a long tensor."""
        return torch.cat([torch.full((s,), t, dtype=torch.long, device=device)
                          for t, s in enumerate(self.task_sizes)])

    def within_task(self, tasks: torch.Tensor, num_logits: int) -> torch.Tensor:
        """``(B, num_logits)`` mask of the logits inside each sample's true task (task-IL evaluation)."""
        if self.kind == "domain":
            return torch.ones(len(tasks), num_logits, dtype=torch.bool, device=tasks.device)
        return self.task_of_class(tasks.device)[None, :num_logits] == tasks[:, None]

    def same_task(self, classes: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Whether each predicted class belongs to the sample's true task (task-id accuracy; always for domains)."""
        if self.kind == "domain":
            return torch.ones_like(tasks, dtype=torch.bool)
        return self.task_of_class(tasks.device)[classes] == tasks


class Classifier(nn.Module):
    """Base of every classifier component (an ``nn.Module`` holding its heads).

    A learner composes one classifier with its adaptation policy. The classifier owns the class layout (class-
    vs domain-incremental), its heads, the loss of a training step, the test-time logits over the seen classes,
    its state (:meth:`state_tensors` / :meth:`load_state_tensors`) and, when ``needs_features``, a look at every
    task's training features after training (:meth:`observe`, fed by one no-gradient pass) before
    :meth:`end_task`.

    ``trained_for_prediction`` is False for classifiers whose test-time logits come from observed statistics
    (prototypes, a ridge solve): the parameters they train (a temporary head) only give a training loss to a
    learner that adapts its backbone, so a learner with nothing else to train trains nothing.
    ``unit_features`` is set by the learner: its features are L2-normalised (what a cosine head needs to be
    exported as one linear layer).
    """

    name: ClassVar[str] = "base"
    options_type: ClassVar[type | None] = None
    needs_features: ClassVar[bool] = False
    trained_for_prediction: ClassVar[bool] = True
    unit_features: bool = False

    def __init__(self, feature_dim: int, layout: ClassLayout, options: Any, device: torch.device) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.layout = layout
        self.options = options
        self.device = device

    def begin_task(self, task: int) -> None:
        """Prepare task ``task`` (e.g. add its head)."""

    def parameters_for(self, task: int, all_seen: bool = False) -> list[nn.Parameter]:
        """Parameters trained in task ``task`` (``all_seen``: every seen class's, for learners that replay)."""
        raise NotImplementedError

    def loss(self, features: torch.Tensor, labels: torch.Tensor, task: int, all_seen: bool = False) -> torch.Tensor:
        """Training loss of a batch of features with global labels."""
        raise NotImplementedError

    def logits(self, features: torch.Tensor, upto: int) -> torch.Tensor:
        """Test-time logits over every class seen once task ``upto`` is learnt (no task identity)."""
        raise NotImplementedError

    def observe(self, features: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        """A batch of task ``task``'s training features (test transforms), after training (``needs_features``)."""

    def end_task(self, task: int, seed: int) -> dict[str, Any]:
        """Finish task ``task`` (e.g. re-align heads). Returns diagnostics for results.json."""
        return {}

    def export_linear(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier after task ``upto`` as one linear layer ``(weight (C, d), bias (C,))``, if it is one."""
        raise NotImplementedError(f"classifier {self.name!r} cannot be written as one linear layer")

    def estimate_state_bytes(self) -> int:
        """An upper estimate of :meth:`state_tensors`' size at the end of the run: one float32 linear layer over
        every class (classifiers keeping more override it)."""
        return 4 * (self.feature_dim + 1) * self.layout.num_classes

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


CLASSIFIERS: Registry[type[Classifier]] = Registry("classifier")


def register_classifier(name: str) -> Callable[[type[Classifier]], type[Classifier]]:
    """Class decorator registering a classifier (and its ``options_type`` as the config section ``name``)."""

    def deco(cls: type[Classifier]) -> type[Classifier]:
        CLASSIFIERS.add(name, cls)
        cls.name = name
        register_choice("classifier", name, cls.options_type)
        return cls

    return deco

"""``aper`` and ``ranpac``: frozen-feature learners with a first-session adaptation, then nothing trained.

First session (task 0 only): a LoRA branch on the layers InfLoRA adapts (the backbone's preset: k and v of every
attention block; the generic LoRA layer, PyTorch's default random ``D`` and a zero ``U``, both trained) and a
cosine head over task 0's classes train with the run's optimiser and schedule (``train.lr`` for the branch,
``train.head_lr`` for the head). Then the branch is frozen for good and the head dropped; later tasks train nothing,
their classes only enter the classifier. The branch stays unmerged, so a layer can route a batch around it
(:meth:`~inflora.lora.LoRALinear.use`): APER's feature is ``concat(pre-trained feature, adapted feature)``, two
passes through the one backbone. The references adapt with an AdaptFormer adapter (APER) or an adapter/SSF
(RanPAC); this package's PET is its generic LoRA layer.

* ``aper`` (APER/ADAM, Zhou et al.): always adapts; cosine prototypes (``prototype``) of every class, task 0's
  included, in the ``2d`` concatenated space.
* ``ranpac`` (McDonnell et al.): the ridge head (``ridge``) on the adapted feature (``adapt: true``, RanPAC's phase
  1) or on the pre-trained one (``adapt: false``, the default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapter.options import RankOptions, TargetOptions
from ..batches import call_model
from ..classifiers.taskhead import CosineHead, HeadOptions, head_loss, head_span
from ..config import opt
from ..lora import LoRALinear, kaiming_down
from ..runtime import Purpose, derive_seed
from .base import Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .lora import wrap_sites

BRANCH = "first_session"


@dataclass
class FirstSessionOptions(TargetOptions, RankOptions, HeadOptions):
    """Options of the first-session adaptation: where the LoRA branch goes, its rank, the training head's scale."""

    def validate(self) -> None:
        TargetOptions.validate(self)
        RankOptions.validate(self)
        HeadOptions.validate(self)


@dataclass
class RanPACOptions(FirstSessionOptions):
    """Options of ``ranpac``: the first session's, and whether to run it."""

    adapt: bool = opt(False, "first-session adaptation (RanPAC's phase 1): train a LoRA branch and a cosine head on "
                             "task 0, then freeze; false: the pre-trained feature")


class FirstSessionLearner(Learner):
    """A LoRA branch and a cosine head trained in task 0 only (when ``adapts``), frozen afterwards; no training in
    later tasks. ``concat``: the classifier reads ``concat(pre-trained, adapted)`` features."""

    concat: ClassVar[bool] = False

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o: FirstSessionOptions = setup.options or self.options_type()  # type: ignore[misc]
        self.adapts = bool(getattr(o, "adapt", True))
        self.rank, self.head_scale = o.rank, o.head_scale
        self.sites: list[list[LoRALinear]] = wrap_sites(self.backbone, o, o.rank) if self.adapts else []
        self.head: CosineHead | None = None
        self.head_first = 0
        self.generator = torch.Generator()

    @classmethod
    def classifier_feature_dim(cls, backbone: nn.Module, options: Any) -> int:
        return int(backbone.feature_dim) * (2 if cls.concat else 1)

    def unit_features(self) -> bool:
        return False if self.concat else super().unit_features()

    def layers(self) -> list[LoRALinear]:
        return [layer for site in self.sites for layer in site]

    def first_session(self, task: int) -> bool:
        """Whether task ``task`` adapts the backbone (task 0, when the learner adapts)."""
        return self.adapts and task == 0

    # ------------------------------------------------------------------------------------------ features
    @contextlib.contextmanager
    def route(self, names: list[str] | None) -> Iterator[None]:
        """Route forward passes through the branches ``names`` only (``[]``: the pre-trained backbone)."""
        with contextlib.ExitStack() as stack:
            for layer in self.layers():
                stack.enter_context(layer.use(names))
            yield

    def features(self, inputs: Any) -> torch.Tensor:
        """The adapted feature, or ``concat(pre-trained, adapted)`` with ``concat``."""
        adapted = call_model(self.backbone, inputs)
        if not self.concat:
            return adapted
        with self.route([]):
            pretrained = call_model(self.backbone, inputs)
        return torch.cat([pretrained, adapted], dim=-1)

    # ------------------------------------------------------------------------------------------ training
    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        if not self.first_session(ctx.index):
            return
        self.generator.manual_seed(derive_seed(ctx.seed, ctx.index, Purpose.DESIGN))
        for site in self.sites:
            down = kaiming_down(self.rank, site[0].in_features, generator=self.generator)
            for layer in site:
                layer.add_branch(BRANCH, down, train_down=True)
        first, stop = head_span(self.classifier.layout, ctx.index)
        self.head = CosineHead(int(self.backbone.feature_dim), stop - first, self.head_scale, self.device)
        self.head_first = first

    def parameter_groups(self, ctx: TaskContext) -> list[dict[str, Any]]:
        """The branch (``train.lr``) and the cosine head (``train.head_lr``) in the first session; nothing later."""
        if not self.first_session(ctx.index) or self.head is None:
            return []
        train = self.setup.train
        branch = [p for layer in self.layers() for p in (layer.branch(BRANCH).down, layer.branch(BRANCH).up)]
        return [{"params": branch, "lr": train.lr},
                {"params": list(self.head.parameters()), "lr": train.head_lr or train.lr}]

    def training_step(self, inputs: Any, labels: torch.Tensor, ctx: TaskContext) -> StepOutput:
        """Cross-entropy of the cosine head on the adapted feature (first session only)."""
        features = call_model(self.backbone, inputs)
        return StepOutput(head_loss(self.head, self.head_first, features.float(), labels, self.name))

    def modules(self) -> list[nn.Module]:
        return [*super().modules(), *([self.head] if self.head is not None else [])]

    def end_task(self, ctx: TaskContext) -> None:
        """Freeze the branch and drop the head after the first session; the classifier then reads the task."""
        if self.first_session(ctx.index):
            for layer in self.layers():
                layer.branch(BRANCH).set_trainable(down=False, up=False)
            self.head = None
        super().end_task(ctx)
        self.task_diagnostics["adapted"] = self.first_session(ctx.index)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for i, layer in enumerate(self.layers()):
            if BRANCH in layer.branches:
                state[f"{BRANCH}.layer{i}.down"] = layer.branch(BRANCH).down.detach().cpu().clone()
                state[f"{BRANCH}.layer{i}.up"] = layer.branch(BRANCH).up.detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if not (self.adapts and self.tasks_done):
            return
        for i, layer in enumerate(self.layers()):
            try:
                down, up = state[f"{BRANCH}.layer{i}.down"], state[f"{BRANCH}.layer{i}.up"]
            except KeyError as exc:
                raise ValueError(f"learner state has no first-session branch {exc}") from None
            layer.add_branch(BRANCH, down, up, train_down=False, train_up=False)

    def estimate_state_bytes(self) -> int:
        branch = sum(4 * self.rank * (layer.in_features + layer.adapted_out) for layer in self.layers())
        return super().estimate_state_bytes() + branch


@register_learner("aper")
class APERLearner(FirstSessionLearner):
    """APER: first-session LoRA adaptation on task 0, then cosine prototypes of ``concat(pre-trained, adapted)``
    features for every class."""

    options_type = FirstSessionOptions
    own_classifier = "prototype"
    concat = True

    def export_parts(self, upto: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        raise NotImplementedError("APER's feature concatenates the pre-trained and the adapted backbone's features "
                                  "(two passes, with and without the branch): not one plain backbone")


@register_learner("ranpac")
class RanPACLearner(FirstSessionLearner):
    """RanPAC: the random-projection ridge head on frozen (optionally first-session adapted) features."""

    options_type = RanPACOptions
    own_classifier = "ridge"

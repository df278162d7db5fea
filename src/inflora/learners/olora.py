"""``olora``: O-LoRA (Wang et al., EMNLP 2023 Findings), orthogonal subspace learning.

Per task a new LoRA pair on every projection (scale ``lora_alpha / rank``); earlier pairs are frozen and merged into
the weights (their down-projections are kept for the penalty). The training step adds

    lambda1 * sum_projections sum_jk |(A_old A_t^T)_jk|  +  lambda2 * sum_{P in new A, B} ||P||_F

(the reference code's absolute values and unsquared norms; ``squared`` gives the paper's squares), where ``A_old``
stacks the earlier tasks' down-projections of the projection along the rank axis: an (r_old x r) product per
projection, never a d x d matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import opt
from .base import LearnerSetup, StepOutput, TaskContext, register_learner
from .family import FamilyOptions, PerTaskLoRALearner


@dataclass
class OLoRAOptions(FamilyOptions):
    """Options of ``olora`` (defaults: the reference code, cmnfriend/O-LoRA)."""

    rank: int = opt(8, "rank r of each task's pair (reference: 8)")
    lora_alpha: float = opt(32.0, "LoRA alpha: every pair is scaled by lora_alpha / rank (reference: 32 / 8 = 4)")
    lambda1: float = opt(0.5, "weight of the orthogonality penalty between old and new down-projections")
    lambda2: float = opt(0.0, "weight of the norm penalty on the new pair's factors")
    squared: bool = opt(False, "squared entries and squared Frobenius norms (the paper) instead of absolute values "
                               "and plain norms (the reference code)")

    def validate(self) -> None:
        super().validate()
        for name in ("lora_alpha", "lambda1", "lambda2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if name != "lora_alpha" and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")


def orthogonality(old_downs: list[torch.Tensor | None], new_downs: list[torch.Tensor], squared: bool
                  ) -> torch.Tensor:
    """``sum_p sum_jk |(A_old,p A_t,p^T)_jk|`` (or squared entries) over projections ``p``; a projection without
    earlier tasks contributes nothing. Float32, differentiable in the new down-projections."""
    total = new_downs[0].new_zeros((), dtype=torch.float32)
    for old, new in zip(old_downs, new_downs, strict=True):
        if old is None:
            continue
        product = old.float() @ new.float().T
        total = total + (product.square().sum() if squared else product.abs().sum())
    return total


def factor_norms(factors: list[torch.Tensor], squared: bool) -> torch.Tensor:
    """``sum_P ||P||_F`` (or squared norms) over ``factors``, in float32."""
    norms = torch.stack([torch.linalg.matrix_norm(p.float()) for p in factors])
    return norms.square().sum() if squared else norms.sum()


@register_learner("olora")
class OLoRALearner(PerTaskLoRALearner):
    """O-LoRA: sequential LoRA whose new down-projections are pushed orthogonal to the earlier ones. The head is
    the classifier component (the spec's choice for an encoder: ``linear`` with ``loss: seen``)."""

    options_type = OLoRAOptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o: OLoRAOptions = self.family_options  # type: ignore[assignment]
        self.scale = float(o.lora_alpha) / o.rank
        self.lambda1, self.lambda2, self.squared = float(o.lambda1), float(o.lambda2), bool(o.squared)
        self.old_downs: list[torch.Tensor | None] = [None] * len(self.projections)

    def branch_scale(self, task: int) -> float:
        return self.scale

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        self.old_downs = [None if ctx.index == 0 else
                          torch.cat([p.branch(t).down.detach() for t in range(ctx.index)]).float()
                          for p in self.projections]

    def penalties(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The orthogonality and norm penalties of the current pairs (float32, autocast off)."""
        with torch.autocast(self.device.type, enabled=False):
            branches = [branch for _, branch in self.current()]
            ortho = orthogonality(self.old_downs, [b.down for b in branches], self.squared)
            norms = factor_norms([f for b in branches for f in (b.down, b.up)], self.squared)
        return ortho, norms

    def training_step(self, inputs: Any, labels: torch.Tensor, ctx: TaskContext) -> StepOutput:
        features = self.features(inputs)
        ce = self.classifier.loss(features.float(), labels, ctx.index)
        ortho, norms = self.penalties()
        loss = ce + self.lambda1 * ortho + self.lambda2 * norms
        logged = torch.stack([ce.detach().float(), ortho.detach(), norms.detach()]).tolist()  # one device sync
        return StepOutput(loss, dict(zip(("ce", "orthogonality", "norms"), logged, strict=True)))

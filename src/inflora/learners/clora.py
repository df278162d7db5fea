"""``clora``: C-LoRA (Smith et al., 2023, "Continual Diffusion"), continually self-regularised LoRA, as the InfLoRA
paper's baseline.

Every task's update is kept: ``W_t = W0 + s * sum_{i<=t} B_i A_i`` (finished pairs merge into the weights). Task
``t``'s training step adds ``lam * sum_projections || P_t (elementwise*) (s B_t A_t) ||_F^2`` with the accumulated past
update ``P_t = s * sum_{i<t} B_i A_i`` (zero at ``t = 0``), pushing the new update away from the entries earlier
tasks changed. The Hadamard product has no cheaper factored form (expanding it costs ``r^2 d_out d_in``), so each
step forms ``B_t A_t`` per projection: ``O(r d_out d_in)`` flops and one ``d_out x d_in`` float32 matrix, besides the
kept ``P_t`` (one float32 ``d_out x d_in`` matrix per projection, recomputed from the stored factors).
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
class CLoRAOptions(FamilyOptions):
    """Options of ``clora`` (the penalty's weight, rank and placement of InfLoRA's baseline are not published)."""

    lam: float = opt(100.0, "weight lambda of the self-regularisation ||P (elementwise*) dW_t||_F^2 (not published; "
                            "the default puts the penalty on the cross-entropy's scale for MiniLM, search it)")
    scale: float = opt(1.0, "scale s of every pair: W = W0 + s * sum_i B_i A_i (C-LoRA has no alpha / r factor)")

    def validate(self) -> None:
        super().validate()
        for name in ("lam", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def self_regularisation(past: list[torch.Tensor | None], ups: list[torch.Tensor], downs: list[torch.Tensor],
                        scale: float) -> torch.Tensor:
    """``sum_p || P_p (elementwise*) (scale * U_p D_p) ||_F^2`` over projections ``p`` (a projection without a past
    update contributes nothing); float32, differentiable in the new factors."""
    total = downs[0].new_zeros((), dtype=torch.float32)
    for p, up, down in zip(past, ups, downs, strict=True):
        if p is None:
            continue
        update = scale * (up.float() @ down.float())
        total = total + (p * update).square().sum()
    return total


@register_learner("clora")
class CLoRALearner(PerTaskLoRALearner):
    """C-LoRA: sequential LoRA, all updates kept (merged), each new update penalised where the past ones changed
    the weights. The loss is the classifier's plus the penalty; the step logs both."""

    options_type = CLoRAOptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o: CLoRAOptions = self.family_options  # type: ignore[assignment]
        self.lam, self.scale = float(o.lam), float(o.scale)
        self.past: list[torch.Tensor | None] = [None] * len(self.projections)

    def branch_scale(self, task: int) -> float:
        return self.scale

    @torch.no_grad()
    def refresh_past(self) -> None:
        """``P = sum_{i<tasks_done} scale * B_i A_i`` per projection, summed in float64 from the stored factors,
        kept in float32 on the device."""
        self.past = []
        for projection in self.projections:
            total = None
            for t in range(self.tasks_done):
                update = projection.branch(t).update()
                total = update if total is None else total + update
            self.past.append(None if total is None else total.float())

    def penalty(self) -> torch.Tensor:
        """The self-regularisation of the current pairs (float32, autocast off)."""
        with torch.autocast(self.device.type, enabled=False):
            branches = [branch for _, branch in self.current()]
            return self_regularisation(self.past, [b.up for b in branches], [b.down for b in branches], self.scale)

    def training_step(self, inputs: Any, labels: torch.Tensor, ctx: TaskContext) -> StepOutput:
        features = self.features(inputs)
        ce = self.classifier.loss(features.float(), labels, ctx.index)
        penalty = self.penalty()
        logged = torch.stack([ce.detach().float(), penalty.detach()]).tolist()  # one device sync
        return StepOutput(ce + self.lam * penalty, dict(zip(("ce", "penalty"), logged, strict=True)))

    def end_task(self, ctx: TaskContext) -> None:
        super().end_task(ctx)
        self.refresh_past()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.refresh_past()

"""``sdlora``: SD-LoRA (Wu et al., ICLR 2025), scalable decoupled LoRA.

Every adapted projection computes ``W0 x + sum_{i<t} alpha_i dir_i x + alpha_t B_t A_t x``: the directions
``dir_i = B_i A_i / norm_i`` of earlier tasks are frozen, their magnitudes ``alpha_i`` (one scalar per task, shared by
every layer and projection) keep training, and the current pair enters unnormalised, times ``alpha_t``. No task
selection at test time; the whole adaptation folds into one plain backbone (:meth:`Learner.export_parts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import opt
from .base import LearnerSetup, TaskContext, register_learner
from .family import FamilyOptions, PerTaskLoRALearner

NORMS = ("factors", "product")


@dataclass
class SDLoRAOptions(FamilyOptions):
    """Options of ``sdlora`` (defaults: the reference code, WuYichen-97/SD-Lora-CL)."""

    magnitude_init: float = opt(0.8, "initial value of every magnitude alpha_i (reference: 0.8)")
    normalize: Literal["factors", "product"] = opt(
        "factors", "normalisation of a finished direction: factors (B A / (||B||_F ||A||_F), the reference code) or "
                   "product (B A / ||B A||_F, the paper)")
    reset_magnitudes: bool = opt(True, "restart every earlier magnitude at magnitude_init when a task begins (the "
                                       "reference rebuilds its model per task); false: they go on from their "
                                       "trained values")

    def validate(self) -> None:
        super().validate()
        value = self.magnitude_init
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"magnitude_init must be a finite number, got {value!r}")
        if self.normalize not in NORMS:
            raise ValueError(f"normalize={self.normalize!r} is not one of {', '.join(NORMS)}")


@torch.no_grad()
def direction_norm(down: torch.Tensor, up: torch.Tensor, form: str) -> torch.Tensor:
    """The norm a finished pair is divided by, in float64: ``||B||_F ||A||_F`` (``factors``) or ``||B A||_F``
    (``product``, as ``sqrt(trace((B^T B)(A A^T)))``: r x r products, never the full ``B A``)."""
    down, up = down.double(), up.double()
    if form == "factors":
        return torch.linalg.matrix_norm(up) * torch.linalg.matrix_norm(down)
    if form == "product":
        return torch.trace((up.T @ up) @ (down @ down.T)).clamp_min(0.0).sqrt()
    raise ValueError(f"normalisation form must be one of {', '.join(NORMS)}, got {form!r}")


@register_learner("sdlora")
class SDLoRALearner(PerTaskLoRALearner):
    """SD-LoRA: per task a new trained pair on every projection, scaled by the task's magnitude; when the next task
    begins the pair is normalised and frozen (its magnitude keeps training). Magnitudes train in the adapter's
    parameter group (``train.lr``); the loss is the classifier's (the linear heads' local cross-entropy is the
    reference's new-class-only loss)."""

    options_type = SDLoRAOptions
    merges = False

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o: SDLoRAOptions = self.family_options  # type: ignore[assignment]
        self.magnitude_init = float(o.magnitude_init)
        self.normalize = o.normalize
        self.reset_magnitudes = o.reset_magnitudes
        self.magnitudes: list[nn.Parameter] = []
        self.normalised = 0  # tasks 0..normalised-1 carry normalised, frozen directions

    def branch_scale(self, task: int) -> nn.Parameter:
        return self.magnitudes[task]

    def _add_magnitude(self, value: float) -> None:
        self.magnitudes.append(nn.Parameter(torch.tensor(float(value), device=self.device), requires_grad=False))

    @torch.no_grad()
    def normalise(self, task: int) -> None:
        """Freeze task ``task``'s pairs and divide each ``B`` by its pair's norm (a pair that never moved from
        ``B = 0`` stays a zero direction)."""
        for projection in self.projections:
            branch = projection.branch(task)
            branch.set_trainable(down=False, up=False)
            norm = direction_norm(branch.down, branch.up, self.normalize)
            if float(norm) > 0.0:
                branch.up.copy_((branch.up.double() / norm).to(branch.up.dtype))

    def begin_task(self, ctx: TaskContext) -> None:
        if len(self.magnitudes) != ctx.index:
            raise RuntimeError(f"task {ctx.index} begins but {len(self.magnitudes)} magnitudes exist")
        for task in range(self.normalised, ctx.index):
            self.normalise(task)
        self.normalised = ctx.index
        if self.reset_magnitudes:
            with torch.no_grad():
                for magnitude in self.magnitudes:
                    magnitude.fill_(self.magnitude_init)
        self._add_magnitude(self.magnitude_init)
        super().begin_task(ctx)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [*super().adapter_parameters(), *self.magnitudes] if self.in_task else []

    def end_task(self, ctx: TaskContext) -> None:
        super().end_task(ctx)
        self.task_diagnostics["magnitudes"] = [float(m) for m in self.magnitudes]

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state["sdlora.magnitudes"] = torch.stack([m.detach().cpu() for m in self.magnitudes]) if self.magnitudes \
            else torch.zeros(0)
        state["sdlora.normalised"] = torch.tensor(self.normalised)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.magnitudes:
            raise RuntimeError("load_state_dict needs a freshly built learner")
        try:
            magnitudes, normalised = state["sdlora.magnitudes"], int(state["sdlora.normalised"])
        except KeyError as exc:
            raise ValueError(f"learner state has no {exc}: not an sdlora state") from None
        done = int(state.get("learner.tasks_done", torch.tensor(0)))
        if magnitudes.shape != (done,) or not 0 <= normalised <= done:
            raise ValueError(f"sdlora state holds {tuple(magnitudes.shape)} magnitudes and {normalised} normalised "
                             f"tasks for {done} finished tasks")
        for value in magnitudes.tolist():
            self._add_magnitude(value)
        super().load_state_dict(state)
        self.normalised = normalised

    def estimate_state_bytes(self) -> int:
        return super().estimate_state_bytes() + 4 * self.num_tasks

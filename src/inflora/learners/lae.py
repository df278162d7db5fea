"""``lae``: LAE (Gao et al., ICCV 2023), its LoRA variant. One online PET shared by all tasks (LoRA on k and v of
the first blocks, each with a learnable scalar scale), an offline PET that is the EMA of the online one (a copy
made when task 1 starts, updated after every training step), calibrated learning (for tasks t >= 1 the PET stays
frozen for the first epochs, the head alone trains) and, at test time, the elementwise maximum of the online and
offline models' softmaxes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapter.options import RankOptions, TargetOptions
from ..batches import call_model
from ..config import opt
from ..lora import LoRABranch, LoRALinear, kaiming_down, use_branches
from ..runtime import Purpose, derive_seed
from .base import Learner, LearnerSetup, StepOutput, TaskContext, register_learner
from .lora import wrap_sites

ONLINE, OFFLINE = "online", "offline"


@dataclass
class LAEOptions(TargetOptions, RankOptions):
    """Options of ``lae`` (defaults: the reference's LoRA variant)."""

    blocks: int | None = opt(5, "adapt only the first N blocks (LAE: blocks 0-4)")
    rank: int = opt(5, "rank of each LoRA (one per adapted output: k and v)")
    decay: float = opt(0.9999, "EMA decay of the offline PET, applied after every training step from task 1 on")
    freeze_epochs: int | None = opt(None, "calibration: head-only epochs at the start of each task t >= 1, a count "
                                          "(< train.epochs); None: freeze_fraction of train.epochs")
    freeze_fraction: float = opt(0.6, "calibration share of each task's epochs when freeze_epochs is None, rounded "
                                      "down (LAE: 3 of 5 epochs, 30 of 50)")

    def validate(self) -> None:
        TargetOptions.validate(self)
        RankOptions.validate(self)
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {self.decay!r}")
        if self.freeze_epochs is not None and (isinstance(self.freeze_epochs, bool) or self.freeze_epochs < 0):
            raise ValueError(f"freeze_epochs must be an integer >= 0 or null, got {self.freeze_epochs!r}")
        if not 0.0 <= self.freeze_fraction < 1.0:
            raise ValueError(f"freeze_fraction must lie in [0, 1), got {self.freeze_fraction!r}")

    def calibration_epochs(self, epochs: int) -> int:
        """Head-only epochs of each task t >= 1 under ``train.epochs = epochs``; at least one epoch must train the
        PET."""
        if self.freeze_epochs is None:
            return math.floor(self.freeze_fraction * epochs)
        if self.freeze_epochs >= epochs:
            raise ValueError(f"lae.freeze_epochs={self.freeze_epochs} leaves no epoch to train the PET: train.epochs="
                             f"{epochs}, so use at most {epochs - 1} (or lae.freeze_fraction)")
        return self.freeze_epochs


@register_learner("lae")
class LAELearner(Learner):
    """LAE with LoRA PETs: per adapted output slice (k, v) of the chosen layers, an online branch (Kaiming-uniform
    down, zero up, learnable scale 1, all trained) and, from task 1, its offline EMA copy (frozen)."""

    options_type = LAEOptions
    partial_gradients = True  # the PET gets no gradient in calibration epochs

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o: LAEOptions = setup.options or LAEOptions()
        o.validate()
        self.opts = o
        self.freeze_epochs = o.calibration_epochs(setup.train.epochs)
        self.layers: list[LoRALinear] = [layer for site in wrap_sites(self.backbone, o, o.rank) for layer in site]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 0, Purpose.DESIGN))
        for layer in self.layers:
            for i in range(len(layer.out_slices)):
                branch = layer.add_branch(f"{ONLINE}{i}", kaiming_down(o.rank, layer.in_features, generator),
                                          train_down=True, learn_scale=True, slices=[i])
                branch.requires_grad_(False)  # the training loop makes the groups trainable
        self.has_offline = False
        self.calibrating = False
        self.ema_updates = 0
        self.ema_pending = False

    # ------------------------------------------------------------------------------------------ the two PETs
    def pet(self, kind: str) -> list[tuple[int, str, LoRABranch]]:
        """``(layer index, branch name, branch)`` of the online or offline PET."""
        return [(i, name, branch) for i, layer in enumerate(self.layers)
                for name, branch in layer.branches.items() if name.startswith(kind)]  # type: ignore[misc]

    def names(self, kind: str) -> list[str]:
        return sorted({name for _, name, _ in self.pet(kind)})

    @staticmethod
    def tensors(branch: LoRABranch) -> list[torch.Tensor]:
        return [branch.down, branch.up, branch.scale]  # type: ignore[list-item]

    @torch.no_grad()
    def make_offline(self) -> None:
        """The offline PET: a frozen copy of the online one (its EMA from now on)."""
        for i, name, branch in self.pet(ONLINE):
            copy = self.layers[i].add_branch(OFFLINE + name[len(ONLINE):], branch.down, branch.up,
                                             scale=float(branch.scale), learn_scale=True, train_up=False,
                                             slices=branch.slices)
            copy.requires_grad_(False)
        self.has_offline = True

    @torch.no_grad()
    def update_offline(self) -> None:
        """One EMA step: ``offline <- decay * offline + (1 - decay) * online`` for every factor and scale."""
        decay = self.opts.decay
        online = {(i, name[len(ONLINE):]): b for i, name, b in self.pet(ONLINE)}
        for i, name, branch in self.pet(OFFLINE):
            for target, source in zip(self.tensors(branch), self.tensors(online[(i, name[len(OFFLINE):])]),
                                      strict=True):
                target.mul_(decay).add_(source.detach(), alpha=1.0 - decay)
        self.ema_updates += 1

    def flush_ema(self) -> None:
        """Apply the EMA step owed for the last optimiser step (the loop steps after :meth:`training_step`)."""
        if self.ema_pending:
            self.update_offline()
            self.ema_pending = False

    def features(self, inputs: Any) -> torch.Tensor:
        """Features of the online model."""
        with use_branches(self.layers, self.names(ONLINE)):
            return call_model(self.backbone, inputs)

    # ------------------------------------------------------------------------------------------ life cycle
    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        if ctx.index >= 1 and not self.has_offline:
            self.make_offline()
        self.task_diagnostics["calibration_epochs"] = self.freeze_epochs if ctx.index >= 1 else 0

    def begin_epoch(self, epoch: int, ctx: TaskContext) -> None:
        """Calibration: for tasks t >= 1, the first ``freeze_epochs`` epochs train the head only."""
        self.calibrating = ctx.index >= 1 and epoch < self.freeze_epochs

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for _, _, branch in self.pet(ONLINE) for p in self.tensors(branch)]  # type: ignore[misc]

    def training_step(self, inputs: Any, labels: torch.Tensor, ctx: TaskContext) -> StepOutput:
        """Cross-entropy over the new task's logits (the classifier's loss) of the online model; the PET takes no
        gradient while calibrating; the offline PET follows after the optimiser step."""
        self.flush_ema()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.calibrating):
            features = self.features(inputs)
        loss = self.classifier.loss(features.float(), labels, ctx.index)
        self.ema_pending = self.has_offline
        return StepOutput(loss, {"calibrating": float(self.calibrating)})

    def end_task(self, ctx: TaskContext) -> None:
        self.flush_ema()
        self.calibrating = False
        super().end_task(ctx)
        self.task_diagnostics["ema_updates"] = self.ema_updates
        if self.has_offline:
            with torch.no_grad():
                online = {(i, n[len(ONLINE):]): b for i, n, b in self.pet(ONLINE)}
                gap = sum(float((b.update() - online[(i, n[len(OFFLINE):])].update()).norm() ** 2)
                          for i, n, b in self.pet(OFFLINE))
                size = sum(float(b.update().norm() ** 2) for b in online.values())
            self.task_diagnostics["offline_gap"] = math.sqrt(gap / size) if size > 0 else 0.0

    # ------------------------------------------------------------------------------------------ inference
    def predict(self, inputs: Any, upto: int) -> torch.Tensor:
        """``log max(softmax(online logits), softmax(offline logits))`` per class (the online model alone before
        task 1); its argmax is LAE's prediction."""
        with self.runtime.autocast():
            online = self.classifier.logits(self.features(inputs).float(), upto).log_softmax(-1)
            if not self.has_offline:
                return online
            with use_branches(self.layers, self.names(OFFLINE)):
                features = call_model(self.backbone, inputs)
            offline = self.classifier.logits(features.float(), upto).log_softmax(-1)
        return torch.maximum(online, offline)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for kind in (ONLINE, OFFLINE):
            for i, name, branch in self.pet(kind):
                for key, tensor in zip(("down", "up", "scale"), self.tensors(branch), strict=True):
                    state[f"lae.layer{i}.{name}.{key}"] = tensor.detach().cpu().clone()
        state["lae.ema_updates"] = torch.tensor(self.ema_updates)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        try:
            if any(k.startswith("lae.") and f".{OFFLINE}" in k for k in state):
                self.make_offline()
            for kind in (ONLINE, OFFLINE):
                for i, name, branch in self.pet(kind):
                    for key, tensor in zip(("down", "up", "scale"), self.tensors(branch), strict=True):
                        tensor.copy_(state[f"lae.layer{i}.{name}.{key}"])
            self.ema_updates = int(state["lae.ema_updates"])
        except KeyError as exc:
            raise ValueError(f"learner state has no {exc} (LAE keeps its online and offline PETs)") from None

    def estimate_state_bytes(self) -> int:
        pet = sum(4 * (self.opts.rank * (b.down.shape[1] + b.up.shape[0]) + 1) for _, _, b in self.pet(ONLINE))
        return super().estimate_state_bytes() + 2 * pet

    def export_parts(self, upto: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        raise NotImplementedError("LAE cannot be exported as one plain model: it predicts with two models (the "
                                  "online PET and its EMA, the offline PET) and takes the larger softmax per class")

"""The training loop of one task: the learner's parameter groups, an optimiser, epochs of the learner's steps."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import batch_size_of, move_to
from .distributed import all_reduce_sum, is_distributed
from .faults import fault
from .learners import Learner, TaskContext
from .runtime import Purpose, derive_seed
from .taskdata import TaskData

log = logging.getLogger("inflora")
MIN_STEPS_TO_JUDGE = 20
"""Tasks with fewer training steps are never flagged as not learning (a tenth of them is too noisy a mean)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""

    def __init__(self, task: int, epoch: int, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at task {task}, epoch {epoch}, step {step}: training diverged "
                         "(try a lower learning rate); the last complete task's checkpoint is kept")
        self.task, self.epoch, self.step = task, epoch, step


@dataclass
class StepRecord:
    """One training step as the loop's loggers see it: the task, the epoch, the step within the epoch (all from 0),
    the epoch's number of steps, the loss (the global batch's mean under torchrun) and the learner's logged figures."""

    task: int
    epoch: int
    step: int
    steps: int
    loss: float
    logs: dict[str, float] = field(default_factory=dict)


StepLogger = Callable[[StepRecord], None]
"""A per-step hook of the training loop (e.g. TensorBoard); it sees every step after the optimiser's update."""


class TaskStep(nn.Module):
    """One training step of the current task as a module: the learner's step, its loss scaled by ``weight``.

    The trainable parameters change every task (a new branch and head), so the training loop wraps a fresh
    ``TaskStep`` in :class:`~torch.nn.parallel.DistributedDataParallel` each task; DDP then averages the gradients
    of exactly that task's parameters. The step's logged figures are kept in ``last_logs``.
    """

    def __init__(self, learner: Learner, ctx: TaskContext) -> None:
        super().__init__()
        self.parts = nn.ModuleList(learner.modules())
        self.learner = learner
        self.ctx = ctx
        self.last_logs: dict[str, Any] = {}

    def forward(self, inputs: Any, labels: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        out = self.learner.training_step(inputs, labels, self.ctx)
        self.last_logs = out.logs
        return out.loss if weight == 1.0 else out.loss * weight


def wrap_ddp(step: TaskStep, device: torch.device, find_unused: bool = False) -> nn.Module:
    """``step`` in DDP when distributed, else unchanged. ``find_unused``: some steps leave trainable parameters
    without a gradient (DDP then finds them each step, and their gradients stay unset)."""
    if not is_distributed():
        return step
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def reference_cosine(epoch: int, epochs: int) -> float:
    """The reference implementation's per-epoch factor ``cos(99 * pi * e / (200 * (E - 1)))`` (1 for a single epoch)."""
    return 1.0 if epochs <= 1 else math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))


def lr_factor(train: Any, epoch: int) -> float:
    """The learning-rate factor of ``epoch`` under ``train.schedule`` (stepped per epoch)."""
    if train.schedule == "reference-cosine":
        return reference_cosine(epoch, train.epochs)
    if train.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / train.epochs))
    if train.schedule == "step":
        return train.gamma ** sum(epoch >= m for m in train.milestones)
    return 1.0


def make_optimizer(train: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    for g in groups:
        g["initial_lr"] = g["lr"]
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=train.weight_decay)
    return torch.optim.SGD(groups, momentum=train.momentum, weight_decay=train.weight_decay)


def train_task(learner: Learner, ctx: TaskContext, data: TaskData, train: Any, progress: bool = False,
               loggers: Sequence[StepLogger] = ()) -> dict[str, Any]:
    """Train task ``ctx.index`` for ``train.epochs`` (``train`` as the learner's ``train_settings`` adjusts it): the
    learner's groups, its steps on seeded batches of the tasks it trains on; every step is handed to ``loggers`` as
    a :class:`StepRecord`. Returns the seconds spent, the last step's logged figures and the mean loss over the
    first and the last tenth of the task's steps (``loss_start``, ``loss_end``: a loss that ends near ``log(classes)``
    shows a run that stopped learning, e.g. a collapsed representation). A learner whose groups hold no parameter
    has nothing to train in this task: no epoch runs."""
    task, runtime = ctx.index, ctx.runtime
    train = learner.train_settings(train)
    groups = learner.parameter_groups(ctx)
    params = [p for g in groups for p in g["params"]]
    if not params:
        return {"train_s": 0.0, "logs": {}, "trainable_parameters": 0}
    for p in params:
        p.requires_grad_(True)
    optimiser = make_optimizer(train, groups)
    indices = data.train_indices(learner.training_tasks(task))
    step_module = wrap_ddp(TaskStep(learner, ctx), runtime.device, find_unused=learner.partial_gradients)
    learner.train_mode(True)
    runtime.sync()
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(train.epochs):
        for g in optimiser.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(train, epoch)
        learner.begin_epoch(epoch, ctx)
        epoch_seed = derive_seed(ctx.seed, task, Purpose.EPOCH + epoch)
        loader = data.epoch_loader(indices, train.batch_size, epoch_seed)
        weights = loader.batch_sampler.weights()  # type: ignore[union-attr]
        bar = tqdm(loader, desc=f"task {task + 1}/{ctx.num_tasks} epoch {epoch + 1}/{train.epochs}",
                   disable=not progress, leave=False)
        seen, epoch_start = 0, time.perf_counter()
        for step, (inputs, labels) in enumerate(bar):
            inputs, labels = move_to(inputs, runtime.device), labels.to(runtime.device)
            with runtime.autocast():
                loss = step_module(inputs, labels, weights[step])
            if fault("train", seed=ctx.seed, task=task, epoch=epoch, step=step) == "nan":
                loss = loss * float("nan")
            value = float(loss.detach())
            if runtime.world_size > 1:  # the global batch's mean loss, so every rank stops together
                value = float(all_reduce_sum(loss.detach().double().reshape(1))) / runtime.world_size
            if not math.isfinite(value):
                raise TrainingDiverged(task, epoch, step, value)
            losses.append(value)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            seen += batch_size_of(inputs)
            if loggers:
                logs = {k: float(v) for k, v in getattr(step_module, "module", step_module).last_logs.items()}
                record = StepRecord(task, epoch, step, len(weights), value, logs)
                for logger in loggers:
                    logger(record)
            bar.set_postfix(loss=f"{value:.3f}", samples_s=f"{seen / (time.perf_counter() - epoch_start):.0f}")
    for p in params:
        p.requires_grad_(False)
    runtime.sync()
    logs = {k: float(v) for k, v in getattr(step_module, "module", step_module).last_logs.items()}
    tenth = max(1, len(losses) // 10)
    ends = {"loss_start": sum(losses[:tenth]) / tenth, "loss_end": sum(losses[-tenth:]) / tenth} if losses else {}
    if len(losses) >= MIN_STEPS_TO_JUDGE and learning_stalled(ends["loss_start"], ends["loss_end"], len(ctx.classes)):
        log.warning("task %d did not learn: its training loss went from %.3f to %.3f, near chance (log %d = %.3f); "
                    "a diverged or collapsed run? (lower train.lr)", task + 1, ends["loss_start"], ends["loss_end"],
                    len(ctx.classes), math.log(len(ctx.classes)))
    return {"train_s": time.perf_counter() - start, "logs": logs,
            "trainable_parameters": sum(p.numel() for p in params), **ends}


def learning_stalled(loss_start: float, loss_end: float, num_classes: int) -> bool:
    """Whether a task's training loss (mean over the first / last tenth of its steps) ended near chance and barely
    fell: ``loss_end >= 0.9 log(num_classes)`` and ``loss_end >= 0.8 loss_start``. The task's own class count gives
    the lowest chance level of any loss over at least its classes, so a healthy task is not flagged; a learner whose
    loss adds other terms may need its own reading. One class: never."""
    if num_classes < 2:
        return False
    return loss_end >= 0.9 * math.log(num_classes) and loss_end >= 0.8 * loss_start

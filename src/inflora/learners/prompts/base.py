"""The shared part of prompt methods (L2P, DualPrompt, CODA-Prompt): a frozen backbone seen through the token seam,
a prompt-free no-gradient query pass, then a prompted pass; learnt prompts, keys and attention vectors in one
parameter store; the training recipe as per-method options."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ...batches import call_model
from ...config import opt
from ...runtime import Purpose, derive_seed
from ...seam import Prefixes, token_seam
from ..base import Learner, LearnerSetup, StepOutput, TaskContext
from .matching import PullMode, uniform


@dataclass
class PromptOptions:
    """What every prompt method shares: its training recipe (each field, when set, overrides the ``train``
    section for this method's tasks) and whether the backbone's dropout runs while training."""

    optimizer: Literal["adam", "sgd"] | None = opt(None, "optimiser of this method's tasks (null: train.optimizer); "
                                                         "the prompt methods' recipe is adam")
    lr: float | None = opt(None, "learning rate of the prompts, keys and attention vectors (null: train.lr)")
    head_lr: float | None = opt(None, "learning rate of the heads (null: this section's lr when set, else "
                                      "train.head_lr or train.lr)")
    schedule: Literal["reference-cosine", "cosine", "step", "constant"] | None = opt(
        None, "per-epoch learning-rate schedule (null: train.schedule)")
    dropout: bool = opt(False, "run the backbone's dropout while training (the reference trains in eval mode, "
                               "which turns BERT's dropout off); the query pass never uses dropout")

    def validate(self) -> None:
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0 or null, got {value}")


@dataclass
class PullOptions:
    """The key-query pull loss of methods that match keys (L2P, DualPrompt)."""

    pull: PullMode = opt("reference", "pull loss: reference (every key chosen in the batch pulled toward every "
                                      "query, summed: the InfLoRA/CODA-P harness) or own (each query pulls the keys "
                                      "it chose, averaged over the batch: the papers)")
    pull_weight: float = opt(1.0, "weight of the pull loss added to the cross-entropy")

    def validate(self) -> None:
        if not (self.pull_weight >= 0 and math.isfinite(self.pull_weight)):
            raise ValueError(f"pull_weight must be a finite number >= 0, got {self.pull_weight}")


def apply_recipe(options: PromptOptions, train: Any) -> Any:
    """``train`` with the recipe fields ``options`` sets (a copy; ``train`` itself when none is set). The heads
    follow the section's ``lr`` unless its ``head_lr`` is set."""
    changes = {k: v for k in ("optimizer", "lr", "schedule") if (v := getattr(options, k)) is not None}
    head_lr = options.head_lr if options.head_lr is not None else options.lr
    if head_lr is not None:
        changes["head_lr"] = head_lr
    if not changes:
        return train
    adjusted = copy.copy(train)
    for key, value in changes.items():
        setattr(adjusted, key, value)
    return adjusted


def check_length(name: str, length: int, *, allow_zero: bool = False) -> None:
    """A prefix length ``L`` gives ``L/2`` key and ``L/2`` value rows: it must be even (and positive)."""
    if length < (0 if allow_zero else 2) or length % 2:
        least = "0 or more" if allow_zero else "at least 2"
        raise ValueError(f"{name} must be even and {least} (L/2 key rows + L/2 value rows), got {length}")


def check_blocks(name: str, blocks: list[int], *, allow_empty: bool = False) -> None:
    """Block indices: distinct, >= 0 (the upper bound is checked against the backbone when the learner is built)."""
    if not blocks and not allow_empty:
        raise ValueError(f"{name} must name at least one block")
    if any(b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
        raise ValueError(f"{name} must hold distinct block indices >= 0 (0-based), got {blocks}")


class PromptLearner(Learner):
    """Base of prompt learners. A method provides :meth:`trainable` (its parameters of the task),
    :meth:`prompt_features` (test-time features from inputs and queries) and :meth:`train_features` (training
    features plus its extra loss and logged figures), and may count per-task figures in ``self.counts``.

    ``features(inputs)`` = the query pass (plain backbone, eval mode, no gradients: the pooled feature the heads
    also read, padding excluded for text) then the prompted pass through the token seam.
    """

    options_type: ClassVar[type | None] = PromptOptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        assert self.options_type is not None
        self.options = setup.options or self.options_type()
        self.options.validate()
        self.seam = token_seam(self.backbone)
        dim = getattr(self.backbone, "feature_dim", None)
        if dim is None:
            raise TypeError(f"{type(self.backbone).__name__} has no feature_dim: prompt methods need an inflora "
                            "Backbone (TimmBackbone or HFTextBackbone)")
        self.query_dim = int(dim)
        self.width = self.seam.attention_width
        self.store = nn.ParameterDict()
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, 0, Purpose.PROMPTS))
        self.counts: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------ parameters
    def check_blocks_exist(self, option: str, blocks: list[int]) -> None:
        """Clear error when ``blocks`` name blocks the backbone lacks."""
        n = self.seam.num_blocks
        if any(b >= n for b in blocks):
            raise ValueError(f"{self.name}.{option}={blocks}: the backbone has {n} blocks (indices 0..{n - 1})")

    def add_parameter(self, name: str, shape: tuple[int, ...] | None = None, value: Tensor | None = None
                      ) -> nn.Parameter:
        """A learnt tensor in the store: ``value``, or ``U(0, 1)`` draws of ``shape`` from the learner's seeded
        generator; frozen until the training loop makes it trainable."""
        if name in self.store:
            raise RuntimeError(f"{self.name} already has a parameter {name!r}")
        data = uniform(shape, self.generator) if value is None else value  # type: ignore[arg-type]
        param = nn.Parameter(data.to(self.device, torch.float32), requires_grad=False)
        self.store[name] = param
        return param

    def count(self, key: str, values: Tensor, size: int) -> None:
        """Add a histogram of ``values`` (``0..size-1``) to the task's counter ``key`` (on the device, no sync)."""
        hist = torch.bincount(values.reshape(-1), minlength=size)
        self.counts[key] = self.counts[key] + hist if key in self.counts else hist

    # ------------------------------------------------------------------------------------------ method hooks
    def trainable(self, ctx: TaskContext) -> list[nn.Parameter]:
        """The prompt-side parameters trained in task ``ctx.index``."""
        raise NotImplementedError

    def prompt_features(self, inputs: Any, query: Tensor, upto: int) -> Tensor:
        """Test-time features (no task identity) once task ``upto`` is learnt."""
        raise NotImplementedError

    def train_features(self, inputs: Any, query: Tensor, ctx: TaskContext
                       ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Training features, the method's extra loss (or None) and figures to log."""
        raise NotImplementedError

    def prepare_state(self, tasks_done: int) -> None:
        """Create the parameters a state of ``tasks_done`` tasks holds (for methods that grow per task)."""

    def final_parameter_count(self) -> int:
        """Number of learnt prompt-side values at the end of the run (for the state size estimate)."""
        return sum(p.numel() for p in self.store.values())

    # ------------------------------------------------------------------------------------------ passes
    @torch.no_grad()
    def query(self, inputs: Any) -> Tensor:
        """The frozen backbone's pooled feature without prompts (eval mode, no gradients), float32."""
        training = [m for m in self.backbone.modules() if m.training]  # restored exactly, whatever the mix
        for module in training:
            module.training = False
        try:
            return call_model(self.backbone, inputs).float()
        finally:
            for module in training:
                module.training = True

    def prompted(self, inputs: Any, *, prefixes: Prefixes | None = None, prompts: Tensor | None = None) -> Tensor:
        """The backbone's pooled feature with prompt tokens after the embeddings and/or prefixes at blocks."""
        return self.seam.features(inputs, prompts=prompts, prefixes=prefixes)

    def upto(self) -> int:
        """The last task whose prompts are in use: the current one during a task, else the last learnt."""
        return self.current_task if self.in_task and self.current_task is not None else self.tasks_done - 1

    def features(self, inputs: Any) -> Tensor:
        return self.prompt_features(inputs, self.query(inputs), self.upto())

    # ------------------------------------------------------------------------------------------ contract
    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        self.counts = {}

    def train_settings(self, train: Any) -> Any:
        return apply_recipe(self.options, train)

    def parameter_groups(self, ctx: TaskContext) -> list[dict[str, Any]]:
        train = self.train_settings(self.setup.train)
        return [{"params": self.trainable(ctx), "lr": train.lr},
                {"params": self.classifier.parameters_for(ctx.index), "lr": train.head_lr or train.lr}]

    def train_mode(self, mode: bool = True) -> None:
        self.backbone.train(mode and self.options.dropout)
        self.classifier.train(mode)
        self.store.train(mode)

    def modules(self) -> list[nn.Module]:
        return [self.backbone, self.classifier, self.store]

    def training_step(self, inputs: Any, labels: Tensor, ctx: TaskContext) -> StepOutput:
        features, extra, logs = self.train_features(inputs, self.query(inputs), ctx)
        ce = self.classifier.loss(features.float(), labels, ctx.index)
        loss = ce if extra is None else ce + extra
        return StepOutput(loss, {"ce": float(ce.detach()), **{k: float(v.detach()) for k, v in logs.items()}})

    def predict(self, inputs: Any, upto: int) -> Tensor:
        with self.runtime.autocast():
            features = self.prompt_features(inputs, self.query(inputs), upto)
        return self.classifier.logits(features.float(), upto)

    def count_diagnostics(self) -> dict[str, Any]:
        """The task's counters for results.json (default: each histogram as a list)."""
        return {k: v.tolist() for k, v in self.counts.items()}

    def end_task(self, ctx: TaskContext) -> None:
        self.task_diagnostics.update(self.count_diagnostics())
        super().end_task(ctx)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        state.update({f"prompts.{k}": v.detach().cpu().clone() for k, v in self.store.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.prepare_state(self.tasks_done)
        saved = {k[len("prompts."):]: v for k, v in state.items() if k.startswith("prompts.")}
        if saved.keys() != set(self.store.keys()):
            missing, extra = sorted(set(self.store.keys()) - saved.keys()), sorted(saved.keys() - set(self.store))
            raise ValueError(f"{self.name} state does not fit: missing prompt tensors {missing}, unexpected {extra}")
        for name, value in saved.items():
            param = self.store[name]
            if param.shape != value.shape:
                raise ValueError(f"{self.name} state: prompt tensor {name!r} has shape {tuple(value.shape)}, this "
                                 f"learner's has {tuple(param.shape)} (other options?)")
            param.copy_(value)

    def estimate_state_bytes(self) -> int:
        return super().estimate_state_bytes() + 4 * self.final_parameter_count()

    def export_parts(self, upto: int) -> tuple[nn.Module, Tensor, Tensor]:
        raise NotImplementedError(
            f"a prompt method ({self.name}) is not one plain model: every input first runs a prompt-free query pass "
            "that selects or weights the prompts inserted into its own second pass, so the adaptation depends on the "
            "input and cannot be folded into the backbone's weights")

"""The learner contract: one continual-learning method as a policy the engine drives without knowing which.

A learner owns its training step, its parameter groups, its prediction from raw inputs, its state, its per-task
diagnostics and its export. The engine calls, for each task ``t``::

    learner.begin_task(ctx)                      # e.g. add a head, design a branch (ctx: TaskContext)
    groups = learner.parameter_groups(ctx)       # [{"params": [...], "lr": ...}, ...]; the loop builds the optimiser
                                                 # from learner.train_settings(train)
    learner.begin_epoch(epoch, ctx)              # per epoch, e.g. keep a part frozen for the first epochs
    out = learner.training_step(inputs, labels, ctx)   # per batch: StepOutput(loss, logs)
    learner.end_task(ctx)                        # e.g. grow a memory, merge, feed and re-align the classifier
    logits = learner.predict(inputs, upto=t)     # evaluation, no task identity (predict_with_features when the
                                                 # feature-drift probe is on: the logits and the features)
    learner.diagnostics()                        # into results.json, per task

and checkpoints ``learner.state_dict()`` whole. A method composes an adaptation policy with a classifier
component (:mod:`inflora.classifiers`), which owns the class layout (class- or domain-incremental).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..batches import call_model
from ..classifiers import Classifier
from ..config import register_choice
from ..lora import merged_copy
from ..registry import Registry
from ..runtime import Runtime

Batches = Iterable[tuple[Any, torch.Tensor]]


@dataclass
class TaskContext:
    """What a learner is told about the task at hand.

    ``train_pass(limit, phase)`` and ``feature_pass()`` are factories of no-gradient passes over the task's training
    data, batches ``(inputs, global labels)`` already on the device: ``train_pass`` with the training transforms
    (a seeded subsample of ``limit`` samples; ``phase`` names the pass for the fault hook), ``feature_pass`` with
    the test transforms over every training sample. ``same_inputs`` is True when the two read identical inputs
    (no random transforms, as for text), so one pass can serve both.
    """

    index: int
    num_tasks: int
    classes: list[int]
    seed: int
    runtime: Runtime
    train_pass: Callable[..., Batches]
    feature_pass: Callable[[], Batches]
    same_inputs: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepOutput:
    """A training step's loss (what the loop back-propagates) and named figures to log."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class LearnerSetup:
    """What every learner is built from."""

    backbone: nn.Module
    classifier: Classifier
    options: Any
    train: Any
    runtime: Runtime
    num_tasks: int
    seed: int


class Learner:
    """Base learner: a frozen backbone and a classifier; trains the classifier's parameters of the task.

    Subclasses override what their method changes. ``options_type`` is the dataclass of the method's typed options
    (the config section named after the method), ``replays_past`` makes the engine train on all tasks so far,
    ``partial_gradients`` says that some steps leave parameters of the groups without a gradient (e.g. a part kept
    frozen for some epochs), so distributed training must look for unused parameters,
    ``own_classifier`` names the classifier of a method that is one (``simplecil`` is ``prototype``: its runs use
    it whatever the preset's ``classifier``), :meth:`classifier_feature_dim` the width of the features the
    classifier reads.
    """

    name: ClassVar[str] = "base"
    options_type: ClassVar[type | None] = None
    replays_past: ClassVar[bool] = False
    partial_gradients: ClassVar[bool] = False
    own_classifier: ClassVar[str | None] = None

    def __init__(self, setup: LearnerSetup) -> None:
        self.setup = setup
        self.runtime = setup.runtime
        self.device = setup.runtime.device
        self.options = setup.options
        self.num_tasks = setup.num_tasks
        self.seed = setup.seed
        own = type(self).own_classifier
        if own is not None and setup.classifier.name != own:
            raise ValueError(f"method {self.name!r} is the classifier {own!r}; it cannot run with classifier "
                             f"{setup.classifier.name!r}")
        self.backbone = setup.backbone.to(self.device)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.classifier = setup.classifier.to(self.device)
        self.classifier.unit_features = self.unit_features()
        self.in_task = False
        self.tasks_done = 0
        self.current_task: int | None = None
        self.task_diagnostics: dict[str, Any] = {}
        self._backbone_trains: bool | None = None

    @classmethod
    def classifier_feature_dim(cls, backbone: nn.Module, options: Any) -> int:
        """Width of the features this learner gives its classifier (the engine builds the classifier with it):
        the backbone's pooled feature by default."""
        return int(backbone.feature_dim)

    def unit_features(self) -> bool:
        """Whether :meth:`features` are L2-normalised (a text backbone built with ``normalize``)."""
        return bool(getattr(self.backbone, "normalize", False))

    # ------------------------------------------------------------------------------------------ life cycle
    def begin_task(self, ctx: TaskContext) -> None:
        """Prepare task ``ctx.index``; the base adds the classifier's head."""
        self.in_task = True
        self.current_task = ctx.index
        self.task_diagnostics = {}
        self._backbone_trains = None
        self.classifier.begin_task(ctx.index)

    def end_task(self, ctx: TaskContext) -> None:
        """Finish the task; the base feeds the classifier its features (when it wants them) and lets it finish."""
        self.finish_task(ctx)

    def finish_task(self, ctx: TaskContext, observed: bool = False) -> None:
        """The classifier's end of the task: one feature pass for it (unless the learner already fed it the
        task's features, ``observed``), then its ``end_task``."""
        if self.classifier.needs_features and not observed:
            with self.runtime.timer(self.task_diagnostics, "features_s"):
                self.observe(ctx.feature_pass(), ctx)
        with self.runtime.timer(self.task_diagnostics, "classifier_s"):
            self.task_diagnostics.update(self.classifier.end_task(ctx.index, ctx.seed))
        self.in_task = False
        self.tasks_done = ctx.index + 1

    def observe(self, batches: Batches, ctx: TaskContext) -> None:
        """Show the classifier the features of ``batches`` (eval mode, no gradients)."""
        self.feature_pass(batches, lambda f, y: self.classifier.observe(f, y, ctx.index))

    @torch.no_grad()
    def feature_pass(self, batches: Batches, on_features: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                     before: Callable[[Any], None] | None = None) -> None:
        """One no-gradient pass in eval mode: ``before(inputs)`` (e.g. hooks reading the attention mask), the
        features (float32), then ``on_features(features, labels)``."""
        self.train_mode(False)
        for inputs, labels in batches:
            if before is not None:
                before(inputs)
            with self.runtime.autocast():
                features = self.features(inputs)
            if on_features is not None:
                on_features(features.float(), labels)

    def training_tasks(self, task: int) -> list[int]:
        """The tasks whose training data task ``task`` trains on (all so far when ``replays_past``)."""
        return list(range(task + 1)) if self.replays_past else [task]

    # ------------------------------------------------------------------------------------------ training
    def train_settings(self, train: Any) -> Any:
        """The optimisation settings (``train`` section) the loop uses for this learner's tasks: ``train``
        unchanged by default; a method with its own recipe (optimiser, learning rate, schedule) returns a modified
        copy."""
        return train

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Backbone-side parameters trained in the current task (none for the base)."""
        return []

    def parameter_groups(self, ctx: TaskContext) -> list[dict[str, Any]]:
        """Optimiser parameter groups with their learning rates: the policy's (``train.lr``), then the
        classifier's (``train.head_lr``, default ``train.lr``). None at all when the policy trains nothing and the
        classifier's trained parameters do not enter its logits (``trained_for_prediction``): training would
        change no prediction, so the task has no training steps."""
        train = self.setup.train
        adapter = self.adapter_parameters()
        if not adapter and not self.classifier.trained_for_prediction:
            return []
        groups = [{"params": self.classifier.parameters_for(ctx.index, all_seen=self.replays_past),
                   "lr": train.head_lr or train.lr}]
        if adapter:
            groups.insert(0, {"params": adapter, "lr": train.lr})
        return groups

    def begin_epoch(self, epoch: int, ctx: TaskContext) -> None:
        """Called by the training loop before epoch ``epoch`` (from 0 to ``train.epochs - 1``) of task ``ctx.index``;
        the base does nothing. A parameter of the groups that gets no gradient in a step is left unchanged by the
        optimiser (declare ``partial_gradients``)."""

    def trains_backbone(self) -> bool:
        """Whether a backbone parameter trains in this task (read once per task, on its first step: the loop has
        made the groups' parameters trainable by then), so features of a frozen backbone need no graph."""
        if self._backbone_trains is None:
            self._backbone_trains = any(p.requires_grad for p in self.backbone.parameters())
        return self._backbone_trains

    def features(self, inputs: Any) -> torch.Tensor:
        """The backbone's pooled features of raw (collated, on-device) inputs."""
        return call_model(self.backbone, inputs)

    def training_step(self, inputs: Any, labels: torch.Tensor, ctx: TaskContext) -> StepOutput:
        """Loss of one batch (the loop runs backward and the optimiser step)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_backbone()):
            features = self.features(inputs)
        loss = self.classifier.loss(features.float(), labels, ctx.index, all_seen=self.replays_past)
        return StepOutput(loss)

    def train_mode(self, mode: bool = True) -> None:
        """Train (dropout on) or eval mode for every module of the learner."""
        self.backbone.train(mode)
        self.classifier.train(mode)

    def modules(self) -> list[nn.Module]:
        """The modules whose parameters a training step may update (wrapped together for DDP)."""
        return [self.backbone, self.classifier]

    # ------------------------------------------------------------------------------------------ inference
    def predict(self, inputs: Any, upto: int) -> torch.Tensor:
        """Logits over every class seen once task ``upto`` is learnt, from raw inputs (no task identity)."""
        with self.runtime.autocast():
            features = self.features(inputs)
        return self.classifier.logits(features.float(), upto)

    def predict_with_features(self, inputs: Any, upto: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`predict`'s logits and, from the same forward pass, the features (float32, ``(n, feature_dim)``)
        the classifier read, or None: the evaluation pass measures feature drift with them
        (:mod:`inflora.drift`). The default computes the features once and the classifier's logits; a learner
        that overrides :meth:`predict` gets ``(predict(...), None)`` unless it overrides this method too."""
        if type(self).predict is not Learner.predict:
            return self.predict(inputs, upto), None
        with self.runtime.autocast():
            features = self.features(inputs).float()
        return self.classifier.logits(features, upto), features

    def routing(self) -> torch.Tensor | None:
        """The task each sample of the latest :meth:`predict` call was sent to, for a learner that picks a
        task-specific part per sample (CoLoR's nearest centroid); None for the rest. The evaluation pass compares
        it with the samples' true tasks (``routing_matrix`` and ``routing_accuracy`` in the diagnostics)."""
        return None

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the learner learnt, as CPU tensors (the checkpoint saves it whole)."""
        state = {f"classifier.{k}": v for k, v in self.classifier.state_tensors().items()}
        state["learner.tasks_done"] = torch.tensor(self.tasks_done)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` into a freshly built learner."""
        if self.tasks_done or self.in_task:
            raise RuntimeError("load_state_dict needs a freshly built learner")
        self.classifier.load_state_tensors({k[len("classifier."):]: v for k, v in state.items()
                                            if k.startswith("classifier.")})
        self.classifier.to(self.device)
        if "learner.tasks_done" in state:
            self.tasks_done = int(state["learner.tasks_done"])

    def estimate_state_bytes(self) -> int:
        """An upper estimate of :meth:`state_dict`'s size at the end of the run (for the free-space check): the
        classifier's (:meth:`Classifier.estimate_state_bytes`) plus what the policy keeps."""
        return self.classifier.estimate_state_bytes()

    # ------------------------------------------------------------------------------------------ reporting
    def diagnostics(self) -> dict[str, Any]:
        """Per-task figures for results.json (called after ``end_task``). ``method_s`` is the seconds of
        method-specific work (e.g. statistics, design, memory), reported as a share of training time."""
        return dict(self.task_diagnostics)

    # ------------------------------------------------------------------------------------------ export
    def export_parts(self, upto: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """A plain backbone (every adaptation folded in) and one linear classifier ``(weight, bias)`` computing
        :meth:`predict` after task ``upto``. Learners that cannot be one plain model raise ``NotImplementedError``
        with the reason."""
        if self.in_task:
            raise RuntimeError("the learner is in the middle of a task: export after the task has ended")
        weight, bias = self.classifier.export_linear(upto)
        return merged_copy(self.backbone), weight, bias


LEARNERS: Registry[type[Learner]] = Registry("method")


def register_learner(name: str, *, replace: bool = False) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator adding a learner to the registry under ``name``; its ``options_type`` (a dataclass with
    :func:`inflora.config.opt` fields, or None) becomes the config section ``name``, its ``own_classifier`` (if
    any) the classifier every run of the method uses."""

    def deco(cls: type[Learner]) -> type[Learner]:
        if not (isinstance(cls, type) and issubclass(cls, Learner)):
            raise TypeError(f"register_learner({name!r}) needs a Learner subclass, got {cls!r}")
        LEARNERS.add(name, cls, replace=replace)
        cls.name = name
        register_choice("method", name, cls.options_type, classifier=cls.own_classifier)
        return cls

    return deco

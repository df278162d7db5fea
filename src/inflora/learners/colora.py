"""``colora``: CoLoR (Wistuba et al., 2023): one plain LoRA branch per task, kept apart (frozen, never merged), and
task identification by k-means centroids of the frozen backbone's features (the S-Prompts pattern, as Renate
implements it). Prediction takes two passes: the frozen backbone names each sample's task (nearest centroid), then
the sample goes through that task's branch and is scored by the classifier's logits of that task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter.options import RankOptions, TargetOptions
from ..batches import call_model, select_samples
from ..config import opt
from ..distributed import gather_pass_rows
from ..kmeans import kmeans, squared_distances
from ..lora import LoRALinear, use_branches
from ..runtime import Purpose, derive_seed
from .base import Batches, Learner, LearnerSetup, TaskContext, register_learner
from .lora import add_task_branches, wrap_sites

MARGIN = 1.0
"""How far below the identified task's lowest logit the other tasks' logits end (they keep their order)."""


@dataclass
class CoLoROptions(TargetOptions, RankOptions):
    """Options of ``colora``: where to adapt, the rank of each task's branch, the task identification."""

    k: int = opt(5, "k-means clusters per task of the frozen backbone's L2-normalised features (task identity)")
    kmeans_iters: int = opt(100, "most Lloyd iterations of each k-means run")
    kmeans_restarts: int = opt(10, "k-means++ seedings per task; the run with the lowest objective is kept")
    kmeans_samples: int | None = opt(None, "training samples per task in the clustering pass (None: all)")
    oracle: bool = opt(False, "also run every seen task's branch at test time, so that the engine's task-IL "
                              "accuracy is CoLoR with the true task identity (the upper bound); class-IL keeps "
                              "the centroid routing; costs one pass per seen task (class-incremental only)")

    def validate(self) -> None:
        TargetOptions.validate(self)
        RankOptions.validate(self)
        for name in ("k", "kmeans_iters", "kmeans_restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kmeans_samples is not None and self.kmeans_samples < 1:
            raise ValueError(f"kmeans_samples must be >= 1 or null, got {self.kmeans_samples}")


@register_learner("colora")
class CoLoRLearner(Learner):
    """CoLoR: a new LoRA branch per task (both factors trained, Kaiming-uniform down, zero up), earlier branches
    frozen and kept unmerged, the classifier's head of each task; k centroids per task for task identification."""

    options_type = CoLoROptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o: CoLoROptions = setup.options or CoLoROptions()
        o.validate()
        if o.oracle and self.classifier.layout.kind != "class":
            raise ValueError("colora.oracle needs a class-incremental scenario: in a domain layout the engine's "
                             "task-IL accuracy equals class-IL, so it cannot show the oracle")
        self.opts = o
        self.sites: list[list[LoRALinear]] = wrap_sites(self.backbone, o, o.rank)
        self.generator = torch.Generator()
        self.centroids: list[torch.Tensor] = []
        self.last_routing: torch.Tensor | None = None

    def layers(self) -> list[LoRALinear]:
        return [layer for site in self.sites for layer in site]

    # ------------------------------------------------------------------------------------------ features
    def features(self, inputs: Any) -> torch.Tensor:
        """Features through the current task's branch only (training and the classifier's feature pass)."""
        names = [] if self.current_task is None else [str(self.current_task)]
        with use_branches(self.layers(), names):
            return call_model(self.backbone, inputs)

    def frozen_features(self, inputs: Any) -> torch.Tensor:
        """The frozen backbone's features (no branch), L2-normalised, float64."""
        with use_branches(self.layers(), []):
            features = call_model(self.backbone, inputs)
        return F.normalize(features.double(), dim=-1)

    @torch.no_grad()
    def frozen_pass(self, batches: Batches) -> torch.Tensor:
        """Normalised frozen features of a pass (eval mode), every rank's rows in pass order."""
        self.train_mode(False)
        rows = []
        for inputs, _ in batches:
            with self.runtime.autocast():
                rows.append(self.frozen_features(inputs))
        if not rows:
            raise ValueError("the clustering pass yielded no samples")
        return gather_pass_rows(torch.cat(rows))

    # ------------------------------------------------------------------------------------------ life cycle
    def begin_task(self, ctx: TaskContext) -> None:
        if ctx.index != len(self.centroids):
            raise RuntimeError(f"task {ctx.index} begins but {len(self.centroids)} tasks have centroids")
        super().begin_task(ctx)
        o = self.opts
        with self.runtime.timer(self.task_diagnostics, "kmeans_s"):
            features = self.frozen_pass(ctx.train_pass(o.kmeans_samples, "kmeans"))
            if len(features) < o.k:
                raise ValueError(f"colora.k={o.k} clusters but task {ctx.index} has only {len(features)} training "
                                 "samples in the clustering pass: lower colora.k")
            self.generator.manual_seed(derive_seed(ctx.seed, ctx.index, Purpose.KMEANS))
            result = kmeans(features, o.k, generator=self.generator, iterations=o.kmeans_iters,
                            restarts=o.kmeans_restarts)
        self.centroids.append(result.centroids)
        self.task_diagnostics.update(kmeans_inertia=result.inertia, kmeans_iterations=result.iterations,
                                     kmeans_points=len(features))
        self.generator.manual_seed(derive_seed(ctx.seed, ctx.index, Purpose.DESIGN))
        add_task_branches(self.sites, str(ctx.index), o.rank, self.generator)

    def adapter_parameters(self) -> list[nn.Parameter]:
        if not self.in_task:
            return []
        name = str(self.current_task)
        return [p for layer in self.layers() for p in (layer.branch(name).down, layer.branch(name).up)]

    def end_task(self, ctx: TaskContext) -> None:
        for layer in self.layers():
            layer.branch(str(ctx.index)).set_trainable(down=False, up=False)
        super().end_task(ctx)
        self.task_diagnostics["method_s"] = self.task_diagnostics.get("kmeans_s", 0.0)

    # ------------------------------------------------------------------------------------------ inference
    def identify(self, inputs: Any, upto: int) -> torch.Tensor:
        """Each sample's task: the tag of the nearest centroid (Euclidean, normalised frozen features) among the
        centroids of tasks ``0..upto``."""
        if upto >= len(self.centroids):
            raise RuntimeError(f"no centroids for task {upto}: {len(self.centroids)} tasks have begun")
        centres = torch.cat(self.centroids[: upto + 1])
        tags = torch.cat([torch.full((len(c),), t, dtype=torch.long, device=centres.device)
                          for t, c in enumerate(self.centroids[: upto + 1])])
        return tags[squared_distances(self.frozen_features(inputs), centres).argmin(1)]

    def branch_logits(self, inputs: Any, task: int, upto: int) -> torch.Tensor:
        """The classifier's logits over the classes seen after ``upto`` of ``inputs`` through branch ``task``."""
        with use_branches(self.layers(), [str(task)]):
            features = call_model(self.backbone, inputs)
        return self.classifier.logits(features.float(), upto)

    def routed_logits(self, inputs: Any, tasks: torch.Tensor, upto: int) -> torch.Tensor:
        """Each sample through its task's branch: samples grouped by task, one pass per group, scattered back."""
        out: torch.Tensor | None = None
        for task in tasks.unique().tolist():
            rows = (tasks == task).nonzero().flatten()
            logits = self.branch_logits(select_samples(inputs, rows), task, upto)
            if out is None:
                out = logits.new_empty(len(tasks), logits.shape[1])
            out[rows] = logits
        assert out is not None
        return out

    def own_branch_logits(self, inputs: Any, upto: int) -> torch.Tensor:
        """Every task's classes scored through that task's own branch (``oracle``)."""
        layout = self.classifier.layout
        out: torch.Tensor | None = None
        for task in range(upto + 1):
            logits = self.branch_logits(inputs, task, upto)
            if out is None:
                out = torch.empty_like(logits)
            columns = layout.task_of_class(logits.device)[: logits.shape[1]] == task
            out[:, columns] = logits[:, columns]
        assert out is not None
        return out

    def keep_within(self, logits: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Class layout: the other tasks' logits shifted below the identified task's lowest logit (in order), so an
        argmax over all classes picks a class of the identified task."""
        inside = self.classifier.layout.within_task(tasks, logits.shape[1])
        low = logits.masked_fill(~inside, float("inf")).amin(1)
        high = logits.masked_fill(inside, float("-inf")).amax(1)
        shift = (high - low).clamp(min=0) + MARGIN
        return torch.where(inside, logits, logits - shift[:, None])

    def predict(self, inputs: Any, upto: int) -> torch.Tensor:
        """Logits over the seen classes: frozen pass -> nearest centroid's task -> that task's branch and logits
        (class layout: the other tasks' logits below; domain layout: the shared head's logits)."""
        with self.runtime.autocast():
            tasks = self.identify(inputs, upto)
            if self.opts.oracle:
                logits = self.own_branch_logits(inputs, upto)
            else:
                logits = self.routed_logits(inputs, tasks, upto)
        self.last_routing = tasks
        logits = logits.float()
        return self.keep_within(logits, tasks) if self.classifier.layout.kind == "class" else logits

    def routing(self) -> torch.Tensor | None:
        """The nearest centroid's task of each sample of the latest :meth:`predict` call."""
        return self.last_routing

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for i, layer in enumerate(self.layers()):
            for name, branch in layer.branches.items():
                state[f"lora.layer{i}.{name}.down"] = branch.down.detach().cpu().clone()
                state[f"lora.layer{i}.{name}.up"] = branch.up.detach().cpu().clone()
        for t, centres in enumerate(self.centroids):
            state[f"colora.centroids.{t}"] = centres.cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        try:
            for t in range(self.tasks_done):
                for i, layer in enumerate(self.layers()):
                    layer.add_branch(str(t), state[f"lora.layer{i}.{t}.down"], state[f"lora.layer{i}.{t}.up"],
                                     train_down=False, train_up=False)
                self.centroids.append(state[f"colora.centroids.{t}"].to(self.device, torch.float64))
        except KeyError as exc:
            raise ValueError(f"learner state has no {exc} (CoLoR keeps a branch and centroids per task)") from None

    def estimate_state_bytes(self) -> int:
        per_task = sum(4 * self.opts.rank * (layer.in_features + layer.adapted_out) for layer in self.layers())
        per_task += 8 * self.opts.k * self.classifier.feature_dim
        return super().estimate_state_bytes() + per_task * self.num_tasks

    # ------------------------------------------------------------------------------------------ reporting, export
    def export_parts(self, upto: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        raise NotImplementedError("CoLoR cannot be exported as one plain model: every input first goes through the "
                                  "frozen backbone to find its task (nearest k-means centroid), then through that "
                                  "task's own LoRA branch; the branches are kept apart, not merged")

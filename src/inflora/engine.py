"""The orchestrator of a continual-learning run: build the data, the scenario, the backbone and the learner, then
for every task begin, train, end and evaluate, and record. It never asks which method runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .backbones import Backbone, build_backbone
from .checkpoint import Checkpoint, CheckpointError, check_config, restore_rng
from .classifiers import CLASSIFIERS, ClassLayout
from .config import ConfigError, RunConfig, to_dict
from .data import ContinualDataset, Scenario, apply_cipher, class_incremental, domain_incremental, load_dataset
from .data.fingerprint import fingerprint_differences, scenario_fingerprint
from .drift import FeatureProbe
from .evaluation import evaluate
from .learners import LEARNERS, Learner, LearnerSetup, TaskContext
from .metrics import accuracy_after, routing_accuracy
from .results import RunState, build_results
from .runtime import Purpose, Runtime, derive_seed, seed_everything
from .taskdata import TaskData
from .training import StepLogger, train_task

log = logging.getLogger("inflora")


def build_scenario(config: RunConfig, dataset: ContinualDataset) -> Scenario:
    """The scenario ``config.scenario`` describes, cut from ``dataset``."""
    s = config.scenario
    if s.kind == "domain":
        return domain_incremental(dataset, order=s.domains, max_train_per_class=s.max_train_per_class,
                                  subsample_seed=config.seed)
    order_seed = config.seed if s.order_seed is None else s.order_seed
    return class_incremental(dataset, s.num_tasks, order=s.order, seed=order_seed,
                             classes_per_task=s.classes_per_task, max_train_per_class=s.max_train_per_class,
                             subsample_seed=config.seed)


def build_model(config: RunConfig, modality: str) -> Backbone:
    m = config.model
    kwargs = dict(m.options)
    if modality == "text":
        kwargs.setdefault("max_length", m.max_length)
    return build_backbone(m.backbone, pretrained=m.pretrained, checkpoint=m.checkpoint, **kwargs)


class Experiment:
    """One seed of one benchmark setting. ``run()`` trains all tasks and returns the results dictionary."""

    def __init__(self, config: RunConfig, progress: bool | None = None) -> None:
        self.config = config
        self.progress = config.train.progress if progress is None else progress
        self.runtime = Runtime.create(config.train.device, config.train.amp)
        if config.train.batch_size % self.runtime.world_size:
            raise ConfigError(f"train.batch_size={config.train.batch_size} is the global batch and must be divisible "
                              f"by the number of processes ({self.runtime.world_size})")
        seed_everything(config.seed)
        self.dataset: ContinualDataset = apply_cipher(
            load_dataset(config.data.name, config.data.data_dir, **config.data.options), config.data.cipher)
        self.scenario: Scenario = build_scenario(config, self.dataset)
        self.fingerprint = scenario_fingerprint(self.dataset, self.scenario)
        self.backbone: Backbone = build_model(config, self.dataset.modality)
        if self.backbone.modality != self.dataset.modality:
            raise ValueError(f"backbone {config.model.backbone!r} reads {self.backbone.modality} inputs but dataset "
                             f"{config.data.name!r} holds {self.dataset.modality} data")
        self.layout = ClassLayout.create(self.scenario.kind, [len(t.classes) for t in self.scenario.tasks])
        learner_type = LEARNERS.get(config.method)
        classifier = CLASSIFIERS.get(config.classifier)(
            learner_type.classifier_feature_dim(self.backbone, config.method_options), self.layout,
            config.classifier_options, self.runtime.device)
        setup = LearnerSetup(self.backbone, classifier, config.method_options, config.train, self.runtime,
                             self.scenario.num_tasks, config.seed)
        self.learner: Learner = learner_type(setup)
        self.data = TaskData(self.dataset, self.scenario, self.backbone.collate, seed=config.seed,
                             runtime=self.runtime, eval_batch_size=config.train.eval_batch_size,
                             num_workers=config.train.num_workers, transforms=config.data.transforms,
                             img_size=self.backbone.img_size or 224, eval_split=config.scenario.eval_split,
                             max_test_per_class=config.scenario.max_test_per_class)
        self.probe = FeatureProbe(config.evaluation.probe_samples)
        self.state = RunState()
        self.on_task_end: list[Callable[[Experiment], None]] = []
        self.step_loggers: list[StepLogger] = []

    @property
    def num_tasks(self) -> int:
        return self.scenario.num_tasks

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def context(self, task: int) -> TaskContext:
        """The task context handed to the learner."""
        data = self.data
        return TaskContext(index=task, num_tasks=self.num_tasks,
                           classes=sorted(self.scenario.global_labels(self.scenario.tasks[task].classes)),
                           seed=self.config.seed, runtime=self.runtime,
                           train_pass=lambda limit=None, phase="design": data.train_pass(task, limit, phase),
                           feature_pass=lambda: data.feature_pass(task), same_inputs=not data.has_transforms)

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        for task in range(self.state.tasks_done, self.num_tasks):
            self.run_task(task)
            for callback in self.on_task_end:
                callback(self)
        return self.results()

    def run_task(self, task: int) -> None:
        ctx, rt, learner = self.context(task), self.runtime, self.learner
        timings: dict[str, float] = {}
        torch.manual_seed(derive_seed(self.config.seed, task, Purpose.TASK))
        with rt.timer(timings, "begin_s"):
            learner.begin_task(ctx)
        log.info("task %d/%d: %d classes, %d training samples", task + 1, self.num_tasks, len(ctx.classes),
                 len(self.data.train_indices(learner.training_tasks(task))))
        trained = train_task(learner, ctx, self.data, self.config.train, self.progress, self.step_loggers)
        timings["train_s"] = trained["train_s"]
        with rt.timer(timings, "end_s"):
            learner.end_task(ctx)
        with rt.timer(timings, "eval_s"):
            row, til, tid, routing = evaluate(learner, self.data, self.layout, task, self.probe)
        diagnostics = {"trainable_parameters": trained["trainable_parameters"],
                       **{f"train_{k}": trained[k] for k in ("loss_start", "loss_end") if k in trained},
                       **learner.diagnostics(),
                       **({"last_step": trained["logs"]} if trained["logs"] else {}),
                       **({} if routing is None else {"routing_matrix": routing,
                                                      "routing_accuracy": routing_accuracy(routing)})}
        share = float(diagnostics.get("method_s", 0.0)) / timings["train_s"] if timings["train_s"] > 0 else 0.0
        self.state.add_task(row, til, tid, timings, diagnostics, self.probe.row if self.probe.active else None)
        log.info("task %d: accuracy on seen tasks %s (mean %.2f); train %.1fs, method-specific work %.1f%%",
                 task + 1, " ".join(f"{a:.1f}" for a in row),
                 accuracy_after(self.state.accuracy, task, self.data.eval_counts()[: task + 1]),
                 timings["train_s"], 100 * share)

    # ------------------------------------------------------------------------------------------ state
    def restore(self, checkpoint: Checkpoint) -> None:
        """Load ``checkpoint`` into this freshly built experiment: learner state, run state, the feature-drift
        references and RNG states; :meth:`run` then continues at the next task."""
        check_config(checkpoint, self.config)
        meta = checkpoint.meta
        self.check_data(checkpoint)
        if self.state.tasks_done or self.learner.tasks_done:
            raise RuntimeError("restore needs a freshly built experiment")
        if meta["num_tasks"] != self.num_tasks:
            raise CheckpointError(f"{checkpoint.path} holds a run of {meta['num_tasks']} tasks; this one has "
                                  f"{self.num_tasks}")
        try:
            self.learner.load_state_dict(checkpoint.section("learner"))
            self.state = RunState(**meta["run_state"])
            self.probe.load_state_dict(checkpoint.section("probe"))
            restore_rng(checkpoint)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint.path} does not fit this run: {exc}") from exc
        log.info("resumed from %s: %d of %d tasks done", checkpoint.path, self.state.tasks_done, self.num_tasks)

    def check_data(self, checkpoint: Checkpoint) -> None:
        """Refuse to resume ``checkpoint`` on data other than the data it was trained on (where the data lives
        may differ)."""
        saved = checkpoint.meta.get("data")
        if saved is None:
            log.warning("%s predates data fingerprints: the data cannot be checked", checkpoint.path)
            return
        differ = fingerprint_differences(saved, self.fingerprint)
        if differ:
            raise ConfigError(f"cannot resume {checkpoint.path} on different data ({'; '.join(differ)}): resume with "
                              "the data the run started with (data.data_dir may change, the data may not) or start "
                              "a new run in another --out")

    def results(self) -> dict[str, Any]:
        header = {"method": self.config.method, "classifier": self.config.classifier,
                  "benchmark": self.config.benchmark, "seed": self.config.seed, "num_tasks": self.num_tasks,
                  "eval_split": self.config.scenario.eval_split,
                  "classes_per_task": [len(t.classes) for t in self.scenario.tasks],
                  "class_order": [self.dataset.class_names[c] for c in self.scenario.class_order],
                  "device": str(self.device), "precision": self.runtime.precision,
                  "data_fingerprint": self.fingerprint, "config": to_dict(self.config)}
        return build_results(self.state, self.data.eval_counts(), header)

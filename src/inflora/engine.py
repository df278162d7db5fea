"""The continual-learning run: data, scenario, backbone, learner; train task after task, evaluate, record."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from . import distributed, metrics
from .alignment import ClassStatistics, align_heads
from .backbones import Backbone, build_backbone
from .batches import batch_size_of, move_to
from .checkpoint import fault
from .config import ConfigError, RunConfig
from .data import ContinualDataset, Scenario, TransformedSplit, class_incremental, domain_incremental, load_dataset
from .data import image_transforms as make_image_transforms
from .learners import LEARNERS, Learner
from .sampling import GlobalBatches, LengthGroupedBatches, RankShares, SeededSamples, ShuffledBatches

log = logging.getLogger("inflora")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf."""

    def __init__(self, task: int, epoch: int, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at task {task}, epoch {epoch}, step {step}: training diverged "
                         "(try a lower learning rate); the last complete task's checkpoint is kept")
        self.task, self.epoch, self.step = task, epoch, step


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_seed(seed: int, task: int, salt: int = 0) -> int:
    """A seed that depends only on the run seed, the task and a purpose, so any task can be replayed alone."""
    return (seed * 1_000_003 + task * 10_007 + salt * 101) % 2**63


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device; under torchrun, ``auto``/``cuda`` mean the local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    if device.type == "cuda" and distributed.is_distributed():
        if device.index is not None:
            raise ValueError(f"train.device={name!r} names one GPU; under torchrun use auto or cuda (each rank "
                             "takes the GPU of its LOCAL_RANK)")
        rank, count = distributed.local_rank(), torch.cuda.device_count()
        if rank >= count:
            raise ValueError(f"train.device={name!r}: this process has LOCAL_RANK {rank} but only {count} GPU(s) are "
                             "visible; start at most one process per GPU (torchrun --nproc_per_node) or use "
                             "train.device=cpu")
        device = torch.device("cuda", rank)
    return device


def reference_cosine(epoch: int, epochs: int) -> float:
    """The reference's per-epoch factor ``cos(99 * pi * e / (200 * (E - 1)))`` (1 for a single epoch)."""
    return 1.0 if epochs <= 1 else math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))


def lr_factor(config: RunConfig, epoch: int) -> float:
    t = config.train
    if t.schedule == "reference-cosine":
        return reference_cosine(epoch, t.epochs)
    if t.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / t.epochs))
    if t.schedule == "step":
        return t.gamma ** sum(epoch >= m for m in t.milestones)
    return 1.0


def _subsample_per_class(indices: list[int], labels: list[int], per_class: int | None, seed: int) -> list[int]:
    if per_class is None:
        return list(indices)
    rng = np.random.RandomState(seed)
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(labels[i], []).append(i)
    keep = []
    for c in sorted(by_class):
        members = by_class[c]
        chosen = rng.permutation(len(members))[:per_class] if len(members) > per_class else range(len(members))
        keep.extend(members[j] for j in chosen)
    return sorted(keep)


@dataclass
class RunState:
    """Everything a run has produced so far (what a checkpoint holds besides tensors)."""

    tasks_done: int = 0
    accuracy: list[list[float]] = field(default_factory=list)
    task_il: list[list[float]] = field(default_factory=list)
    task_id: list[list[float]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    memory_dims: list[dict[str, list[Any]]] = field(default_factory=list)


class Experiment:
    """One seed of one benchmark setting. ``run()`` trains all tasks and returns the results dictionary."""

    def __init__(self, config: RunConfig, progress: bool | None = None) -> None:
        self.config = config
        self.progress = config.train.progress if progress is None else progress
        self.device = resolve_device(config.train.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if config.train.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size={config.train.batch_size} is the global batch and must be divisible "
                              f"by the number of processes ({self.world_size})")
        seed_everything(config.seed)
        self.dataset: ContinualDataset = load_dataset(config.data.name, config.data.data_dir, **config.data.options)
        self.scenario: Scenario = self._scenario()
        self.backbone: Backbone = self._backbone()
        if self.backbone.modality != self.dataset.modality:
            raise ValueError(f"backbone {config.model.backbone!r} reads {self.backbone.modality} inputs but dataset "
                             f"{config.data.name!r} holds {self.dataset.modality} data")
        self.learner: Learner = LEARNERS[config.method](self.backbone, config, self.scenario.num_tasks, self.device,
                                                        shared_head=self.scenario.kind == "domain")
        self.class_stats = ClassStatistics(self.backbone.feature_dim, self.device)
        self.state = RunState()
        self.on_task_end: list[Callable[[Experiment], None]] = []

    # ------------------------------------------------------------------------------------------ setup
    def _scenario(self) -> Scenario:
        s = self.config.scenario
        if s.kind == "domain":
            return domain_incremental(self.dataset, order=s.domains, max_train_per_class=s.max_train_per_class,
                                      subsample_seed=self.config.seed)
        order_seed = self.config.seed if s.order_seed is None else s.order_seed
        return class_incremental(self.dataset, s.num_tasks, order=s.order, seed=order_seed,
                                 classes_per_task=s.classes_per_task, max_train_per_class=s.max_train_per_class,
                                 subsample_seed=self.config.seed)

    def _backbone(self) -> Backbone:
        m = self.config.model
        kwargs = dict(m.options)
        if self.dataset.modality == "text":
            kwargs.setdefault("max_length", m.max_length)
        return build_backbone(m.backbone, pretrained=m.pretrained, checkpoint=m.checkpoint, **kwargs)

    @property
    def num_tasks(self) -> int:
        return self.scenario.num_tasks

    def _transform(self, train: bool) -> Callable[[Any], Any] | None:
        if self.dataset.modality != "image":
            return None
        return make_image_transforms(self.config.data.transforms, train, self.backbone.img_size or 224)

    def _split(self, split: str, indices: list[int], train_transforms: bool) -> Dataset:
        source = getattr(self.dataset, split)
        if source is None:
            raise ValueError(f"dataset {self.dataset.name!r} has no {split} split")
        subset = source.subset(indices)
        return TransformedSplit(subset, self._transform(train_transforms), target_transform=self.scenario.global_label)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                lengths: list[int] | None = None) -> DataLoader:
        """A loader over ``dataset``. Shuffled: this rank's shares (:class:`RankShares`) of seeded global batches of
        ``batch_size``, text batches grouped by ``lengths`` (less padding). Unshuffled: ``dataset`` in order."""
        workers = self.config.train.num_workers
        generator = torch.Generator().manual_seed(seed)
        if shuffle:
            plan: GlobalBatches = (LengthGroupedBatches(lengths, batch_size, seed) if lengths is not None
                                   else ShuffledBatches(len(dataset), batch_size, seed))  # type: ignore[arg-type]
            return DataLoader(dataset, batch_sampler=RankShares(plan, self.rank, self.world_size),
                              num_workers=workers, collate_fn=self.backbone.collate,
                              generator=None if lengths is not None else generator)
        return DataLoader(dataset, batch_size=batch_size, generator=generator, num_workers=workers,
                          collate_fn=self.backbone.collate, drop_last=False)

    def _seeded(self, dataset: Dataset, seed: int) -> Dataset:
        """Images: random training transforms seeded per sample (the same on any number of processes)."""
        return SeededSamples(dataset, seed) if self.dataset.modality == "image" else dataset

    def _shard(self, dataset: Dataset) -> Dataset:
        """This rank's share of a no-gradient pass (every ``world_size``-th sample); sums are all-reduced after."""
        if self.world_size == 1:
            return dataset
        return Subset(dataset, range(self.rank, len(dataset), self.world_size))  # type: ignore[arg-type]

    def _lengths(self, split: str, indices: list[int]) -> list[int] | None:
        """Characters per text sample (a proxy for tokens); None for images."""
        if self.dataset.modality != "text":
            return None
        source = getattr(self.dataset, split)
        return [len(source.load(i)) for i in indices]

    def _length_order(self, split: str, indices: list[int]) -> list[int]:
        """Positions of ``indices`` in the order no-gradient passes take them. Text: by length, so batches carry
        little padding (sums and accuracies do not depend on the order); images: as given."""
        lengths = self._lengths(split, indices)
        if lengths is None:
            return list(range(len(indices)))
        return sorted(range(len(indices)), key=lambda k: (lengths[k], indices[k]))

    def _eval_order(self, split: str, indices: list[int]) -> list[int]:
        """``indices`` in the order of :meth:`_length_order`."""
        return [indices[k] for k in self._length_order(split, indices)]

    def train_indices(self, task: int) -> list[int]:
        tasks = self.scenario.tasks[: task + 1] if self.learner.replays_past else [self.scenario.tasks[task]]
        return sorted(i for t in tasks for i in t.train_indices)

    def stats_loader(self, task: int, phase: str = "design") -> Callable[[], Iterable[Any]]:
        """Loader factory for the statistics passes: task ``task``'s training data, training transforms (this
        rank's share). ``phase`` ("design" or "memory") only names the pass for the fault hook."""
        indices = list(self.scenario.tasks[task].train_indices)
        limit = self.config.adapter.stats_samples
        if limit is not None and limit < len(indices):
            rng = np.random.RandomState(task_seed(self.config.seed, task, 1) % 2**32)
            indices = sorted(rng.choice(indices, size=limit, replace=False).tolist())
        indices = self._eval_order("train", indices)

        def make() -> Iterator[Any]:
            seed = task_seed(self.config.seed, task, 2)
            torch.manual_seed(seed)
            dataset = self._seeded(self._split("train", indices, train_transforms=True), seed)
            loader = self._loader(self._shard(dataset), self.config.train.eval_batch_size)

            def batches() -> Iterator[Any]:
                for i, batch in enumerate(loader):
                    fault("stats", task=task, phase=phase, batch=i)
                    yield batch

            return batches()

        return make

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        for task in range(self.state.tasks_done, self.num_tasks):
            self.run_task(task)
            for callback in self.on_task_end:
                callback(self)
        return self.results()

    def run_task(self, task: int) -> None:
        cfg = self.config
        info = self.scenario.tasks[task]
        timings: dict[str, float] = {"stats_s": 0.0, "design_s": 0.0, "memory_s": 0.0}
        torch.manual_seed(task_seed(cfg.seed, task))
        num_classes = len(info.classes)
        for key, value in self.learner.begin_task(task, num_classes, self.stats_loader(task)).items():
            timings[key] = timings.get(key, 0.0) + value
        log.info("task %d/%d: %d classes, %d training samples", task + 1, self.num_tasks, num_classes,
                 len(self.train_indices(task)))
        timings["train_s"] = self.train_task(task)
        for key, value in self.learner.end_task(task, self.stats_loader(task, "memory")).items():
            timings[key] = timings.get(key, 0.0) + value
        if cfg.alignment.enabled:
            start = time.perf_counter()
            self.align(task)
            timings["align_s"] = time.perf_counter() - start
        start = time.perf_counter()
        row, til, tid = self.evaluate(task)
        timings["eval_s"] = time.perf_counter() - start
        overhead = timings["stats_s"] + timings["design_s"] + timings["memory_s"]
        timings["overhead_share"] = overhead / timings["train_s"] if timings["train_s"] > 0 else 0.0
        s = self.state
        s.accuracy.append(row)
        s.task_il.append(til)
        s.task_id.append(tid)
        s.timings.append(timings)
        adapter = getattr(self.learner, "adapter", None)
        s.memory_dims.append({k: list(v) for k, v in adapter.memory_dims().items()} if adapter else {})
        s.tasks_done = task + 1
        log.info("task %d: accuracy on seen tasks %s (mean %.2f); train %.1fs, InfLoRA overhead %.1f%%", task + 1,
                 " ".join(f"{a:.1f}" for a in row),
                 metrics.accuracy_after(s.accuracy, task, self.test_counts()[: task + 1]),
                 timings["train_s"], 100 * timings["overhead_share"])

    def train_task(self, task: int) -> float:
        """Train the current task's parameters for ``train.epochs``. Returns seconds spent."""
        cfg, t = self.config, self.config.train
        learner = self.learner
        adapter_params = learner.adapter_parameters()
        head_params = learner.head_parameters(task)
        for p in head_params:
            p.requires_grad_(True)
        groups = [{"params": head_params, "lr": t.head_lr or t.lr}]
        if adapter_params:
            groups.insert(0, {"params": adapter_params, "lr": t.lr})
        for g in groups:
            g["initial_lr"] = g["lr"]
        if t.optimizer == "adam":
            optimiser: torch.optim.Optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=t.weight_decay)
        else:
            optimiser = torch.optim.SGD(groups, momentum=t.momentum, weight_decay=t.weight_decay)
        amp = t.amp and self.device.type == "cuda"
        indices = self.train_indices(task)
        dataset = self._split("train", indices, train_transforms=True)
        lengths = self._lengths("train", indices)
        model = distributed.wrap_ddp(distributed.TaskStep(learner, task), self.device)
        learner.backbone.train()
        start = time.perf_counter()
        for epoch in range(t.epochs):
            for g in optimiser.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(cfg, epoch)
            epoch_seed = task_seed(cfg.seed, task, 10 + epoch)
            loader = self._loader(self._seeded(dataset, epoch_seed), t.batch_size, shuffle=True, seed=epoch_seed,
                                  lengths=lengths)
            weights = loader.batch_sampler.weights()  # type: ignore[union-attr]
            bar = tqdm(loader, desc=f"task {task + 1}/{self.num_tasks} epoch {epoch + 1}/{t.epochs}",
                       disable=not self.progress, leave=False)
            seen, epoch_start = 0, time.perf_counter()
            for step, (inputs, labels) in enumerate(bar):
                inputs, labels = move_to(inputs, self.device), labels.to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = model(inputs, labels, weights[step])
                if fault("train", task=task, epoch=epoch, step=step) == "nan":
                    loss = loss * float("nan")
                value = float(loss.detach())
                if self.world_size > 1:  # the global batch's mean loss, so every rank stops together
                    value = float(distributed.all_reduce_sum(loss.detach().double().reshape(1))) / self.world_size
                if not math.isfinite(value):
                    raise TrainingDiverged(task, epoch, step, value)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                seen += batch_size_of(inputs)
                bar.set_postfix(loss=f"{value:.3f}", samples_s=f"{seen / (time.perf_counter() - epoch_start):.0f}")
        for p in head_params:
            p.requires_grad_(False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def _features(self, dataset: Dataset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        amp = self.config.train.amp and self.device.type == "cuda"
        self.learner.backbone.eval()
        for inputs, labels in self._loader(self._shard(dataset), self.config.train.eval_batch_size):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                features = self.learner.features(move_to(inputs, self.device))
            yield features.float(), labels.to(self.device)

    def align(self, task: int) -> None:
        """Classifier alignment: add the task's class statistics (test transforms), re-align the heads."""
        info = self.scenario.tasks[task]
        dataset = self._split("train", self._eval_order("train", list(info.train_indices)), train_transforms=False)
        stats = self.class_stats if self.world_size == 1 else ClassStatistics(self.backbone.feature_dim, self.device)
        for features, labels in self._features(dataset):
            stats.add(features, labels)
        if stats is not self.class_stats:
            self._add_reduced(stats, sorted({self.scenario.global_label(c) for c in info.classes}))
        if task == 0 and self.scenario.kind == "class":
            return
        seen = sorted({self.scenario.global_label(c) for c in self.scenario.classes_seen(task)})
        generator = torch.Generator().manual_seed(task_seed(self.config.seed, task, 3))
        upto = 0 if self.scenario.kind == "domain" else task
        align_heads(self.learner.heads, self.class_stats, seen, upto, self.config.alignment, generator)

    def _add_reduced(self, shard: ClassStatistics, classes: list[int]) -> None:
        """Sum each rank's class statistics of ``classes`` over all ranks into ``self.class_stats``."""
        d = shard.dim
        packed = torch.zeros(len(classes), 1 + d + d * d, dtype=torch.float64, device=self.device)
        for row, c in zip(packed, classes, strict=True):
            if c in shard.counts:
                row[0] = shard.counts[c]
                row[1 : 1 + d] = shard.sums[c]
                row[1 + d :] = shard.outer[c].flatten()
        distributed.all_reduce_sum(packed)
        total = self.class_stats
        for row, c in zip(packed, classes, strict=True):
            if row[0] == 0:
                continue
            if c not in total.counts:
                total.sums[c] = torch.zeros(d, dtype=torch.float64, device=total.device)
                total.outer[c] = torch.zeros(d, d, dtype=torch.float64, device=total.device)
                total.counts[c] = 0
            total.sums[c] += row[1 : 1 + d].to(total.device)
            total.outer[c] += row[1 + d :].reshape(d, d).to(total.device)
            total.counts[c] += int(row[0])

    def eval_split(self) -> str:
        return self.config.scenario.eval_split

    def eval_indices(self, task: int) -> list[int]:
        info = self.scenario.tasks[task]
        split = self.eval_split()
        indices = info.val_indices if split == "val" else info.test_indices
        if indices is None:
            raise ValueError(f"dataset {self.dataset.name!r} has no validation split; use scenario.eval_split=test")
        labels = getattr(self.dataset, split).labels
        return _subsample_per_class(list(indices), labels, self.config.scenario.max_test_per_class, 12345 + task)

    def test_counts(self) -> list[int]:
        return [len(self.eval_indices(t)) for t in range(self.num_tasks)]

    @torch.no_grad()
    def evaluate(self, upto: int) -> tuple[list[float], list[float], list[float]]:
        """Accuracies on each seen task's evaluation data: class-IL, task-IL (inside the true task's head) and
        task identity (the predicted class belongs to the true task).

        One no-gradient pass covers every seen task's samples; text goes in order of length, so batches are full
        and carry little padding. Counts are kept per task (and summed over ranks)."""
        split = self.eval_split()
        heads = self.learner.heads
        domain = self.scenario.kind == "domain"
        task_of_class = heads.task_of_class().to(self.device)
        pairs = [(i, j) for j in range(upto + 1) for i in self.eval_indices(j)]  # (sample, its task)
        pairs = [pairs[k] for k in self._length_order(split, [i for i, _ in pairs])]
        dataset = self._split(split, [i for i, _ in pairs], train_transforms=False)
        owner = torch.tensor([j for _, j in pairs], dtype=torch.long)[self.rank :: self.world_size].to(self.device)
        counts = torch.zeros(4, upto + 1, dtype=torch.long, device=self.device)  # correct, task-IL, task-id, total
        seen = 0
        for features, labels in self._features(dataset):
            tasks = owner[seen : seen + len(labels)]
            seen += len(labels)
            logits = self.learner.logits(features, upto)
            pred = logits.argmax(-1)
            hit = pred == labels
            if domain:
                hit_til, hit_tid = hit, torch.ones_like(hit)
            else:
                inside = task_of_class[None, : logits.shape[1]] == tasks[:, None]
                hit_til = logits.masked_fill(~inside, float("-inf")).argmax(-1) == labels
                hit_tid = task_of_class[pred] == tasks
            for row, flags in enumerate((hit, hit_til, hit_tid, torch.ones_like(hit))):
                counts[row].index_add_(0, tasks, flags.long())
        counts = distributed.all_reduce_sum(counts.cpu())
        total = counts[3].clamp(min=1).double()
        row, til, tid = ((100.0 * counts[k].double() / total).tolist() for k in range(3))
        return row, til, tid

    # ------------------------------------------------------------------------------------------ results
    def results(self) -> dict[str, Any]:
        from .config import to_dict

        s = self.state
        counts = self.test_counts()[: s.tasks_done]
        summary = metrics.summarize(s.accuracy, counts, task_il=s.task_il, task_id=s.task_id) if s.accuracy else {}
        return {
            "method": self.config.method,
            "benchmark": self.config.benchmark,
            "seed": self.config.seed,
            "num_tasks": self.num_tasks,
            "tasks_done": s.tasks_done,
            "eval_split": self.eval_split(),
            "classes_per_task": [len(t.classes) for t in self.scenario.tasks],
            "class_order": [self.dataset.class_names[c] for c in self.scenario.class_order],
            "test_counts": counts,
            "accuracy_matrix": s.accuracy,
            "task_il_matrix": s.task_il,
            "task_id_matrix": s.task_id,
            **summary,
            "accuracy_after_task": [metrics.accuracy_after(s.accuracy, t, counts) for t in range(s.tasks_done)],
            "timings": s.timings,
            "memory_dims": s.memory_dims,
            "device": str(self.device),
            "config": to_dict(self.config),
        }

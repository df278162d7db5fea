"""Task data: the datasets of each task as loaders: training batches, no-gradient passes in length order, the
evaluation samples, and this process's share of each under torchrun."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .batches import move_to
from .data import ContinualDataset, Scenario, TransformedSplit, subsample_per_class
from .data import image_transforms as make_image_transforms
from .faults import fault
from .runtime import Purpose, Runtime, derive_seed
from .sampling import (
    GlobalBatches,
    LengthGroupedBatches,
    PaddingBoundedBatches,
    RankShares,
    SeededSamples,
    ShuffledBatches,
)

EVAL_SUBSAMPLE_SEED = 12345
"""Evaluation subsamples (``scenario.max_test_per_class``) do not depend on the run seed: every seed is scored on
the same samples."""


class TaskData:
    """Loaders over a scenario's tasks for one run (its seed, batch sizes, transforms and runtime)."""

    def __init__(self, dataset: ContinualDataset, scenario: Scenario, collate: Callable[..., Any], *, seed: int,
                 runtime: Runtime, eval_batch_size: int, num_workers: int, transforms: str, img_size: int,
                 eval_split: str, max_test_per_class: int | None) -> None:
        self.dataset = dataset
        self.scenario = scenario
        self.collate = collate
        self.seed = seed
        self.runtime = runtime
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.recipe = transforms
        self.img_size = img_size
        self.eval_split = eval_split
        self.max_test_per_class = max_test_per_class

    @property
    def has_transforms(self) -> bool:
        """Whether samples go through (random) transforms: images yes, text no."""
        return self.dataset.modality == "image"

    # ------------------------------------------------------------------------------------------ datasets
    def split(self, split: str, indices: list[int], train_transforms: bool) -> Dataset:
        """Samples ``indices`` of ``split`` with global labels, under the training or the test transform."""
        source = getattr(self.dataset, split)
        if source is None:
            raise ValueError(f"dataset {self.dataset.name!r} has no {split} split")
        transform = (make_image_transforms(self.recipe, train_transforms, self.img_size)  # type: ignore[arg-type]
                     if self.has_transforms else None)
        return TransformedSplit(source.subset(indices), transform, target_transform=self.scenario.global_label)

    def seeded(self, dataset: Dataset, seed: int) -> Dataset:
        """Images: random training transforms seeded per sample (the same on any number of processes)."""
        return SeededSamples(dataset, seed) if self.has_transforms else dataset

    def shard(self, dataset: Dataset) -> Dataset:
        """This rank's share of a no-gradient pass (every ``world_size``-th sample); sums are all-reduced after."""
        rt = self.runtime
        if rt.world_size == 1:
            return dataset
        return Subset(dataset, range(rt.rank, len(dataset), rt.world_size))  # type: ignore[arg-type]

    def lengths(self, split: str, indices: list[int]) -> list[int] | None:
        """Characters per text sample (a proxy for tokens); None for images."""
        if self.dataset.modality != "text":
            return None
        source = getattr(self.dataset, split)
        return [len(source.load(i)) for i in indices]

    def length_order(self, split: str, indices: list[int]) -> list[int]:
        """Positions of ``indices`` in the order no-gradient passes take them. Text: by length, so batches carry
        little padding (sums and accuracies do not depend on the order); images: as given."""
        lengths = self.lengths(split, indices)
        if lengths is None:
            return list(range(len(indices)))
        return sorted(range(len(indices)), key=lambda k: (lengths[k], indices[k]))

    def in_length_order(self, split: str, indices: list[int]) -> list[int]:
        return [indices[k] for k in self.length_order(split, indices)]

    # ------------------------------------------------------------------------------------------ loaders
    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
               lengths: list[int] | None = None) -> DataLoader:
        """A loader over ``dataset``. Shuffled: this rank's shares (:class:`RankShares`) of seeded global batches of
        ``batch_size``, text batches grouped by ``lengths`` (less padding). Unshuffled: ``dataset`` in order, with
        ``lengths`` (ascending: a length-ordered pass) cut where padding would grow (:class:`PaddingBoundedBatches`)."""
        generator = torch.Generator().manual_seed(seed)
        if shuffle:
            plan: GlobalBatches = (LengthGroupedBatches(lengths, batch_size, seed) if lengths is not None
                                   else ShuffledBatches(len(dataset), batch_size, seed))  # type: ignore[arg-type]
            return DataLoader(dataset, batch_sampler=RankShares(plan, self.runtime.rank, self.runtime.world_size),
                              num_workers=self.num_workers, collate_fn=self.collate,
                              generator=None if lengths is not None else generator)
        if lengths is not None:
            return DataLoader(dataset, batch_sampler=PaddingBoundedBatches(lengths, batch_size),
                              num_workers=self.num_workers, collate_fn=self.collate)
        return DataLoader(dataset, batch_size=batch_size, generator=generator, num_workers=self.num_workers,
                          collate_fn=self.collate, drop_last=False)

    def pass_loader(self, dataset: Dataset, split: str, ordered: list[int]) -> DataLoader:
        """A no-gradient pass over ``dataset`` (samples ``ordered`` of ``split``, in length order): text on one
        process in batches of at most ``eval_batch_size`` with bounded padding; otherwise (images, or this rank's
        share under torchrun, where every rank must take the same number of batches because the classifiers' sums
        are all-reduced per batch) in batches of ``eval_batch_size``."""
        lengths = self.lengths(split, ordered) if self.runtime.world_size == 1 else None
        return self.loader(self.shard(dataset), self.eval_batch_size, lengths=lengths)

    def train_indices(self, tasks: list[int]) -> list[int]:
        return sorted(i for t in tasks for i in self.scenario.tasks[t].train_indices)

    def epoch_loader(self, indices: list[int], batch_size: int, epoch_seed: int) -> DataLoader:
        """One epoch of shuffled training batches over ``indices`` (training transforms, seeded per sample)."""
        dataset = self.split("train", indices, train_transforms=True)
        return self.loader(self.seeded(dataset, epoch_seed), batch_size, shuffle=True, seed=epoch_seed,
                           lengths=self.lengths("train", indices))

    def _batches(self, loader: DataLoader, on_batch: Callable[[int], None] | None = None
                 ) -> Iterator[tuple[Any, torch.Tensor]]:
        device = self.runtime.device
        for i, (inputs, labels) in enumerate(loader):
            if on_batch is not None:
                on_batch(i)
            yield move_to(inputs, device), labels.to(device)

    def train_pass(self, task: int, limit: int | None = None, phase: str = "design"
                   ) -> Iterator[tuple[Any, torch.Tensor]]:
        """A no-gradient pass over task ``task``'s training data with the training transforms (this rank's share):
        a seeded subsample of ``limit`` samples (all when None), in length order. Seeds torch for the pass.
        ``phase`` names the pass for the fault hook."""
        indices = list(self.scenario.tasks[task].train_indices)
        if limit is not None and limit < len(indices):
            rng = np.random.RandomState(derive_seed(self.seed, task, Purpose.SUBSAMPLE) % 2**32)
            indices = sorted(rng.choice(indices, size=limit, replace=False).tolist())
        indices = self.in_length_order("train", indices)
        seed = derive_seed(self.seed, task, Purpose.STATS)
        torch.manual_seed(seed)
        dataset = self.seeded(self.split("train", indices, train_transforms=True), seed)
        loader = self.pass_loader(dataset, "train", indices)
        return self._batches(loader, lambda i: fault("stats", task=task, phase=phase, batch=i))

    def feature_pass(self, task: int) -> Iterator[tuple[Any, torch.Tensor]]:
        """A no-gradient pass over all of task ``task``'s training data with the test transforms, in length order
        (this rank's share)."""
        indices = self.in_length_order("train", list(self.scenario.tasks[task].train_indices))
        dataset = self.split("train", indices, train_transforms=False)
        return self._batches(self.pass_loader(dataset, "train", indices))

    # ------------------------------------------------------------------------------------------ evaluation
    def eval_indices(self, task: int) -> list[int]:
        info = self.scenario.tasks[task]
        indices = info.val_indices if self.eval_split == "val" else info.test_indices
        if indices is None:
            raise ValueError(f"dataset {self.dataset.name!r} has no validation split; use scenario.eval_split=test")
        if self.max_test_per_class is None:
            return list(indices)
        labels = getattr(self.dataset, self.eval_split).labels
        seed = derive_seed(EVAL_SUBSAMPLE_SEED, task, Purpose.EVAL_SUBSAMPLE) % 2**32
        return subsample_per_class(indices, labels, self.max_test_per_class, seed).tolist()

    def eval_counts(self) -> list[int]:
        return [len(self.eval_indices(t)) for t in range(self.scenario.num_tasks)]

    def _eval_pairs(self, upto: int) -> list[tuple[int, int]]:
        """``(sample, its task)`` of every seen task's evaluation samples, in the order of :meth:`eval_pass`."""
        pairs = [(i, j) for j in range(upto + 1) for i in self.eval_indices(j)]
        return [pairs[k] for k in self.length_order(self.eval_split, [i for i, _ in pairs])]

    def eval_pass(self, upto: int) -> tuple[Iterator[tuple[Any, torch.Tensor]], torch.Tensor]:
        """One pass over every seen task's evaluation samples in length order (this rank's share), and the task
        of each of this rank's samples in pass order."""
        pairs = self._eval_pairs(upto)
        dataset = self.split(self.eval_split, [i for i, _ in pairs], train_transforms=False)
        rt = self.runtime
        owner = torch.tensor([j for _, j in pairs], dtype=torch.long)[rt.rank :: rt.world_size].to(rt.device)
        return self._batches(self.pass_loader(dataset, self.eval_split, [i for i, _ in pairs])), owner

    def probe_indices(self, task: int, per_task: int) -> list[int]:
        """A fixed seeded subset of ``per_task`` of task ``task``'s evaluation samples (all when it has fewer),
        sorted; like the evaluation subsample it does not depend on the run seed."""
        indices = self.eval_indices(task)
        if per_task >= len(indices):
            return sorted(indices)
        rng = np.random.RandomState(derive_seed(EVAL_SUBSAMPLE_SEED, task, Purpose.PROBE) % 2**32)
        return sorted(rng.choice(indices, size=per_task, replace=False).tolist())

    def probe_slots(self, upto: int, per_task: int) -> tuple[torch.Tensor, list[int]]:
        """For this rank's samples of :meth:`eval_pass` ``(upto)``, in pass order, the row of each in the probe
        table (tasks ``0..upto`` one after the other, each in :meth:`probe_indices` order; -1: not a probe sample),
        and the number of probe samples of each task."""
        chosen = [self.probe_indices(j, per_task) for j in range(upto + 1)]
        offsets = np.cumsum([0, *(len(c) for c in chosen)]).tolist()
        row = {(i, j): offsets[j] + k for j, c in enumerate(chosen) for k, i in enumerate(c)}
        rt = self.runtime
        slots = [row.get(pair, -1) for pair in self._eval_pairs(upto)][rt.rank :: rt.world_size]
        return torch.tensor(slots, dtype=torch.long, device=rt.device), [len(c) for c in chosen]

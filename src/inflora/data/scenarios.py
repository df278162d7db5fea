"""Continual-learning scenarios: cutting a :class:`~inflora.data.base.ContinualDataset` into a sequence of tasks.

* class-incremental: each task brings new classes; a class's global label is its position in ``class_order``, so
  each task's classes occupy a contiguous block of the label space;
* domain-incremental: each task is one domain with the whole label space (``class_order = 0..C-1``).

Task indices point into ``dataset.train`` / ``dataset.test`` / ``dataset.val`` and are sorted ascending.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .base import ContinualDataset

__all__ = ["Scenario", "Task", "class_incremental", "domain_incremental", "subsample_per_class"]


@dataclass
class Task:
    """One task: its classes (original ids) and sample indices into the dataset's splits."""

    index: int
    classes: list[int]
    train_indices: list[int]
    test_indices: list[int]
    val_indices: list[int] | None
    domain: int | None = None


@dataclass
class Scenario:
    """A sequence of tasks and the global label space ``class_order`` (original class ids)."""

    kind: Literal["class", "domain"]
    tasks: list[Task]
    class_order: list[int]
    label_map: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.label_map = {c: i for i, c in enumerate(self.class_order)}
        if len(self.label_map) != len(self.class_order):
            raise ValueError("class_order lists a class twice")

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        """Size of the global label space."""
        return len(self.class_order)

    def global_label(self, cls: int) -> int:
        """Position of original class id ``cls`` in ``class_order``."""
        return self.label_map[int(cls)]

    def global_labels(self, labels: Sequence[int]) -> list[int]:
        """:meth:`global_label` of each of ``labels``."""
        return [self.label_map[int(c)] for c in labels]

    def classes_seen(self, t: int) -> list[int]:
        """Original class ids seen once task ``t`` (0-based) is learnt, in ``class_order`` order."""
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"task {t} out of range 0..{self.num_tasks - 1}")
        if self.kind == "domain":
            return list(self.class_order)
        return [c for task in self.tasks[: t + 1] for c in task.classes]


def subsample_per_class(indices: np.ndarray, labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Keep at most ``max_per_class`` of ``indices`` per label (seeded, independent of task order); sorted.
    ``labels`` is indexed by the values of ``indices``. The one per-class subsampling of the package."""
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if max_per_class < 1:
        raise ValueError(f"at most {max_per_class} samples per class: must be >= 1")
    rng = np.random.RandomState(seed)
    keep = []
    for c in np.unique(labels[indices]):
        idx = indices[labels[indices] == c]
        keep.append(
            np.sort(rng.choice(idx, max_per_class, replace=False)) if len(idx) > max_per_class else idx
        )
    return np.sort(np.concatenate(keep)) if keep else indices


def _class_order(
    dataset: ContinualDataset,
    num_tasks: int,
    order: str,
    seed: int,
    groups: dict[str, list[int]] | None,
    classes_per_task: int | None,
) -> list[list[int]]:
    """Classes of each task (original ids)."""
    c = dataset.num_classes
    if order == "groups":
        groups = groups if groups is not None else dataset.class_groups
        if not groups:
            raise ValueError(f"order='groups' needs class groups, and dataset {dataset.name!r} defines none")
        if classes_per_task is not None:
            raise ValueError("classes_per_task cannot be combined with order='groups'")
        if len(groups) != num_tasks:
            raise ValueError(
                f"order='groups' gives one task per group: {len(groups)} groups but num_tasks={num_tasks}"
            )
        per_task = [[int(x) for x in g] for g in groups.values()]
        for name, g in zip(groups, per_task, strict=True):
            if not g:
                raise ValueError(f"class group {name!r} is empty")
            bad = [x for x in g if not 0 <= x < c]
            if bad:
                raise ValueError(f"class group {name!r} has class ids outside 0..{c - 1}: {bad[:5]}")
        return per_task
    if order == "natural":
        ids = list(range(c))
    elif order == "shuffled":
        ids = np.random.RandomState(seed).permutation(c).tolist()
    else:
        raise ValueError(f"unknown class order {order!r}; valid: natural, shuffled, groups")
    if classes_per_task is None:
        if c % num_tasks:
            raise ValueError(
                f"{dataset.name}: {c} classes cannot be split evenly into {num_tasks} tasks; choose a divisor "
                f"of {c} or set classes_per_task (uses the first num_tasks * classes_per_task classes)"
            )
        classes_per_task = c // num_tasks
    elif classes_per_task < 1 or num_tasks * classes_per_task > c:
        raise ValueError(
            f"{dataset.name}: {num_tasks} tasks x {classes_per_task} classes needs 1..{c} classes in all, "
            f"but the dataset has {c}"
        )
    return [ids[t * classes_per_task : (t + 1) * classes_per_task] for t in range(num_tasks)]


def class_incremental(
    dataset: ContinualDataset,
    num_tasks: int,
    order: Literal["natural", "shuffled", "groups"] = "natural",
    seed: int = 0,
    groups: dict[str, list[int]] | None = None,
    classes_per_task: int | None = None,
    max_train_per_class: int | None = None,
    subsample_seed: int = 0,
) -> Scenario:
    """Class-incremental scenario with ``num_tasks`` disjoint sets of classes.

    ``order``: ``natural`` (ids 0..C-1), ``shuffled`` (``numpy.random.RandomState(seed).permutation``, as the
    reference) or ``groups`` (one task per group of ``groups`` or ``dataset.class_groups``, in dict order).
    ``max_train_per_class`` keeps a seeded subsample of each class's training samples (quick runs).
    Raises ``ValueError`` on an impossible split or a class without train or test samples.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    per_task = _class_order(dataset, num_tasks, order, seed, groups, classes_per_task)
    flat = [x for g in per_task for x in g]
    if len(set(flat)) != len(flat):
        dup = sorted({x for x in flat if flat.count(x) > 1})
        raise ValueError(f"classes in more than one task: {[dataset.class_names[x] for x in dup[:5]]}")

    train_y = np.asarray(dataset.train.labels, dtype=np.int64)
    train_idx = np.arange(len(train_y))
    if max_train_per_class is not None:
        train_idx = subsample_per_class(train_idx, train_y, int(max_train_per_class), subsample_seed)
    test_y = np.asarray(dataset.test.labels, dtype=np.int64)
    val_y = None if dataset.val is None else np.asarray(dataset.val.labels, dtype=np.int64)
    for name, y in (("train", train_y[train_idx]), ("test", test_y)):
        missing = sorted(set(flat) - set(np.unique(y).tolist()))
        if missing:
            names = [dataset.class_names[x] for x in missing[:5]]
            raise ValueError(f"{dataset.name}: {len(missing)} class(es) have no {name} samples: {names}")

    tasks = []
    for t, classes in enumerate(per_task):
        cls = np.asarray(classes)
        tasks.append(
            Task(
                index=t,
                classes=list(classes),
                train_indices=train_idx[np.isin(train_y[train_idx], cls)].tolist(),
                test_indices=np.flatnonzero(np.isin(test_y, cls)).tolist(),
                val_indices=None if val_y is None else np.flatnonzero(np.isin(val_y, cls)).tolist(),
            )
        )
    return Scenario(kind="class", tasks=tasks, class_order=flat)


def domain_incremental(
    dataset: ContinualDataset,
    order: Sequence[str] | None = None,
    num_tasks: int | None = None,
    max_train_per_class: int | None = None,
    subsample_seed: int = 0,
) -> Scenario:
    """Domain-incremental scenario: one task per domain (in ``order``, default ``dataset.domain_names``), each
    with all classes. ``num_tasks``, when given, must equal the number of domains used."""
    if dataset.domain_names is None or dataset.train.domains is None or dataset.test.domains is None:
        raise ValueError(f"dataset {dataset.name!r} has no domains; domain-incremental scenarios need one")
    names = list(dataset.domain_names if order is None else order)
    unknown = [d for d in names if d not in dataset.domain_names]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"invalid domain order {names}; use distinct names among {dataset.domain_names}")
    if num_tasks is not None and num_tasks != len(names):
        raise ValueError(f"domain-incremental: num_tasks={num_tasks} but {len(names)} domains {names}")

    train_y = np.asarray(dataset.train.labels, dtype=np.int64)
    train_d = np.asarray(dataset.train.domains, dtype=np.int64)
    test_d = np.asarray(dataset.test.domains, dtype=np.int64)
    val_d = None
    if dataset.val is not None and dataset.val.domains is not None:
        val_d = np.asarray(dataset.val.domains, dtype=np.int64)
    train_by_domain = {}
    for d in sorted(
        dataset.domain_names.index(n) for n in names
    ):  # domain-id order: independent of task order
        idx = np.flatnonzero(train_d == d)
        if max_train_per_class is not None and len(idx):
            idx = subsample_per_class(idx, train_y, int(max_train_per_class), subsample_seed + d)
        train_by_domain[d] = idx

    tasks = []
    for t, name in enumerate(names):
        d = dataset.domain_names.index(name)
        test_idx = np.flatnonzero(test_d == d)
        if not len(train_by_domain[d]) or not len(test_idx):
            raise ValueError(
                f"{dataset.name}: domain {name!r} has no {'train' if len(test_idx) else 'test'} samples"
            )
        tasks.append(
            Task(
                index=t,
                classes=list(range(dataset.num_classes)),
                train_indices=train_by_domain[d].tolist(),
                test_indices=test_idx.tolist(),
                val_indices=None if val_d is None else np.flatnonzero(val_d == d).tolist(),
                domain=d,
            )
        )
    return Scenario(kind="domain", tasks=tasks, class_order=list(range(dataset.num_classes)))

"""Tests of class- and domain-incremental scenarios."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from inflora.data import ContinualDataset, ListSplit, class_incremental, domain_incremental, load_dataset


def _toy(
    num_classes: int = 12, per_class: int = 5, val: bool = True, domains: int | None = None
) -> ContinualDataset:
    """A text dataset with ``per_class`` train, 2 test and 1 val samples per class (interleaved order)."""

    def split(n: int) -> ListSplit:
        labels = [c for _ in range(n) for c in range(num_classes)]
        doms = None if domains is None else [i % domains for i in range(len(labels))]
        return ListSplit([f"s{i}" for i in range(len(labels))], labels, doms)

    return ContinualDataset(
        name="toy",
        modality="text",
        class_names=[f"c{i}" for i in range(num_classes)],
        train=split(per_class * (domains or 1)),
        test=split(2 * (domains or 1)),
        val=split(1) if val else None,
        class_groups={"g0": [0, 5, 6], "g1": [1, 2, 3, 4], "g2": [7, 8, 9, 10, 11]},
        domain_names=None if domains is None else [f"d{i}" for i in range(domains)],
    )


def _check_partition(ds: ContinualDataset, sc) -> None:  # type: ignore[no-untyped-def]
    seen_train: set[int] = set()
    for t, task in enumerate(sc.tasks):
        assert task.index == t
        assert {ds.train.labels[i] for i in task.train_indices} == set(task.classes)
        assert {ds.test.labels[i] for i in task.test_indices} == set(task.classes)
        assert task.train_indices == sorted(task.train_indices)
        assert seen_train.isdisjoint(task.train_indices)
        seen_train.update(task.train_indices)
        # each task's classes are a contiguous block of global labels
        glob = sorted(sc.global_label(c) for c in task.classes)
        assert glob == list(range(glob[0], glob[0] + len(glob)))


def test_natural_order() -> None:
    ds = _toy()
    sc = class_incremental(ds, num_tasks=3)
    assert sc.kind == "class" and sc.num_tasks == 3
    assert [t.classes for t in sc.tasks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sc.class_order == list(range(12)) and sc.label_map == {c: c for c in range(12)}
    assert len(sc.tasks[0].train_indices) == 20 and len(sc.tasks[0].test_indices) == 8
    assert sc.tasks[1].val_indices is not None and len(sc.tasks[1].val_indices) == 4
    assert sc.classes_seen(1) == list(range(8))
    _check_partition(ds, sc)


def test_shuffled_order_seeded_like_reference() -> None:
    ds = _toy()
    sc = class_incremental(ds, num_tasks=4, order="shuffled", seed=1993)
    expected = np.random.RandomState(1993).permutation(12).tolist()
    assert sc.class_order == expected
    assert [t.classes for t in sc.tasks] == [expected[i : i + 3] for i in range(0, 12, 3)]
    assert sc.global_labels(expected) == list(range(12))
    again = class_incremental(ds, num_tasks=4, order="shuffled", seed=1993)
    assert [t.train_indices for t in again.tasks] == [t.train_indices for t in sc.tasks]
    assert class_incremental(ds, num_tasks=4, order="shuffled", seed=0).class_order != expected
    _check_partition(ds, sc)


def test_groups_order() -> None:
    ds = _toy()
    sc = class_incremental(ds, num_tasks=3, order="groups")
    assert [t.classes for t in sc.tasks] == [[0, 5, 6], [1, 2, 3, 4], [7, 8, 9, 10, 11]]
    assert sc.class_order == [0, 5, 6, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert sc.global_label(5) == 1 and sc.global_label(1) == 3
    assert sc.classes_seen(0) == [0, 5, 6]
    _check_partition(ds, sc)
    custom = class_incremental(ds, num_tasks=2, order="groups", groups={"x": [11, 10], "y": [0]})
    assert custom.class_order == [11, 10, 0] and custom.tasks[1].classes == [0]


def test_errors() -> None:
    ds = _toy()
    with pytest.raises(ValueError, match=r"12 classes cannot be split evenly into 5 tasks"):
        class_incremental(ds, num_tasks=5)
    with pytest.raises(ValueError, match=r"3 groups but num_tasks=4"):
        class_incremental(ds, num_tasks=4, order="groups")
    with pytest.raises(ValueError, match=r"more than one task"):
        class_incremental(ds, num_tasks=2, order="groups", groups={"a": [0, 1], "b": [1, 2]})
    with pytest.raises(ValueError, match=r"outside"):
        class_incremental(ds, num_tasks=1, order="groups", groups={"a": [99]})
    with pytest.raises(ValueError, match=r"unknown class order"):
        class_incremental(ds, num_tasks=3, order="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"5 tasks x 3 classes"):
        class_incremental(ds, num_tasks=5, classes_per_task=3)
    with pytest.raises(ValueError, match=r"num_tasks must be >= 1"):
        class_incremental(ds, num_tasks=0)
    with pytest.raises(ValueError, match=r"has no domains"):
        domain_incremental(ds)
    no_groups = _toy()
    no_groups.class_groups = None
    with pytest.raises(ValueError, match=r"defines none"):
        class_incremental(no_groups, num_tasks=3, order="groups")


def test_class_without_test_samples_is_an_error() -> None:
    ds = _toy()
    ds.test = ListSplit(["a"] * 11, list(range(11)))
    with pytest.raises(ValueError, match=r"no test samples: \['c11'\]"):
        class_incremental(ds, num_tasks=3)


def test_classes_per_task_uses_first_classes() -> None:
    ds = _toy()
    sc = class_incremental(ds, num_tasks=5, classes_per_task=2)
    assert [t.classes for t in sc.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sc.class_order == list(range(10))
    _check_partition(ds, sc)


def test_max_train_per_class() -> None:
    ds = _toy(per_class=5)
    sc = class_incremental(ds, num_tasks=3, max_train_per_class=2, subsample_seed=3)
    for task in sc.tasks:
        assert np.bincount([ds.train.labels[i] for i in task.train_indices]).max() == 2
        assert len(task.train_indices) == 2 * len(task.classes) and len(task.test_indices) == 2 * len(
            task.classes
        )
    same = class_incremental(ds, num_tasks=3, order="shuffled", max_train_per_class=2, subsample_seed=3)
    picked = sorted(i for t in sc.tasks for i in t.train_indices)
    assert picked == sorted(i for t in same.tasks for i in t.train_indices)  # independent of the class order
    other = class_incremental(ds, num_tasks=3, max_train_per_class=2, subsample_seed=4)
    assert picked != sorted(i for t in other.tasks for i in t.train_indices)
    big = class_incremental(ds, num_tasks=3, max_train_per_class=100)
    assert sum(len(t.train_indices) for t in big.tasks) == len(ds.train)


def test_domain_incremental() -> None:
    ds = _toy(num_classes=4, per_class=3, val=False, domains=3)
    sc = domain_incremental(ds)
    assert sc.kind == "domain" and sc.num_tasks == 3 and sc.class_order == [0, 1, 2, 3]
    assert [t.domain for t in sc.tasks] == [0, 1, 2]
    for t in sc.tasks:
        assert t.classes == [0, 1, 2, 3] and t.val_indices is None
        assert {ds.train.domains[i] for i in t.train_indices} == {t.domain}  # type: ignore[index]
        assert {ds.test.domains[i] for i in t.test_indices} == {t.domain}  # type: ignore[index]
    assert sc.classes_seen(0) == [0, 1, 2, 3]
    rev = domain_incremental(ds, order=["d2", "d0"], num_tasks=2)
    assert [t.domain for t in rev.tasks] == [2, 0] and rev.tasks[0].train_indices == sc.tasks[2].train_indices
    sub = domain_incremental(ds, max_train_per_class=1)
    assert all(len(t.train_indices) == 4 for t in sub.tasks)
    with pytest.raises(ValueError, match=r"invalid domain order"):
        domain_incremental(ds, order=["d9"])
    with pytest.raises(ValueError, match=r"num_tasks=5"):
        domain_incremental(ds, num_tasks=5)


def _shared_data() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data"]
    if os.environ.get("INFLORA_DATA"):
        candidates.append(Path(os.environ["INFLORA_DATA"]))
    return next((p for p in candidates if (p / "clinc150").is_dir()), None)


@pytest.mark.skipif(_shared_data() is None, reason="shared data folder (../shared/data) not found")
def test_clinc150_domain_groups() -> None:
    ds = load_dataset("clinc150", _shared_data())
    sc = class_incremental(ds, num_tasks=10, order="groups")
    assert sc.num_tasks == 10 and all(len(t.classes) == 15 for t in sc.tasks)
    assert all(len(t.train_indices) == 1500 and len(t.test_indices) == 450 for t in sc.tasks)
    assert all(t.val_indices is not None and len(t.val_indices) == 300 for t in sc.tasks)
    quick = class_incremental(ds, num_tasks=5, max_train_per_class=10)
    assert [len(t.train_indices) for t in quick.tasks] == [300] * 5

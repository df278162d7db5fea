"""Continual-learning metrics over an accuracy matrix (pure functions, no torch).

Accuracy matrix ``acc``: ``acc[i][j]`` is the accuracy (percent) on task ``j``'s test data after training task
``i``, for ``j <= i``. It may be given as a list of rows of growing length (row ``i`` holds ``i + 1`` entries) or
as a 2-D array/list with NaN above the diagonal; entries above the diagonal (``j > i``) are never read. ``T`` is the
number of rows (tasks trained so far). ``counts[j]`` is the number of test samples of task ``j`` (length ``T``).

Definitions (``T`` tasks, indices from 0):

* ``A_t`` (:func:`accuracy_after`): accuracy over all test samples of tasks ``0..t`` after training task ``t``,
  i.e. ``sum_j n_j a[t][j] / sum_j n_j`` (sample-weighted, as the reference reports it) when counts are given,
  else the task-averaged ``(1 / (t + 1)) sum_j a[t][j]``.
* Final accuracy ``A_{T-1}`` (:func:`final_accuracy`); average incremental accuracy
  ``A_bar = (1 / T) sum_t A_t`` (:func:`average_accuracy`).
* Forgetting of task ``j < T-1``: ``f_j = max_{j <= i <= T-2} (a[i][j] - a[T-1][j])`` (:func:`forgetting_per_task`);
  forgetting ``F = mean_{j < T-1} f_j`` (:func:`forgetting`; not clipped at 0, so it can be negative when accuracy
  on old tasks rose).
* Backward transfer ``BWT = mean_{j < T-1} (a[T-1][j] - a[j][j])`` (:func:`backward_transfer`).

With a single task (``T == 1``) forgetting and BWT are ``0.0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy_after",
    "average_accuracy",
    "backward_transfer",
    "final_accuracy",
    "forgetting",
    "forgetting_per_task",
    "mean_std",
    "routing_accuracy",
    "routing_accuracy_overall",
    "summarize",
]


def _rows(acc: Any, name: str = "acc") -> list[np.ndarray]:
    """Validate ``acc`` and return its lower triangle as rows (row ``i`` of length ``i + 1``, float64)."""
    if isinstance(acc, np.ndarray):
        if acc.ndim != 2:
            raise ValueError(f"{name} must be a 2-D accuracy matrix, got an array of shape {acc.shape}")
        acc = list(acc)
    if isinstance(acc, (str, bytes)) or not isinstance(acc, Sequence):
        raise ValueError(f"{name} must be a list of rows or a 2-D array, got {type(acc).__name__}")
    if len(acc) == 0:
        raise ValueError(f"{name} is empty: it needs at least one row (one trained task)")
    rows: list[np.ndarray] = []
    for i, row in enumerate(acc):
        try:
            arr = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} row {i} is not a sequence of numbers: {row!r}") from e
        if arr.ndim != 1:
            raise ValueError(f"{name} row {i} must be 1-D (a list of accuracies), got shape {arr.shape}")
        if arr.shape[0] < i + 1:
            raise ValueError(
                f"{name} is ragged: row {i} has {arr.shape[0]} entries but needs at least {i + 1} "
                f"(accuracies on tasks 0..{i} after training task {i})"
            )
        tri = arr[: i + 1]
        bad = np.flatnonzero(~np.isfinite(tri))
        if bad.size:
            raise ValueError(
                f"{name}[{i}][{int(bad[0])}] is {tri[bad[0]]}: entries j <= i must be finite numbers "
                "(only entries above the diagonal may be NaN)"
            )
        rows.append(tri)
    return rows


def _weights(counts: Sequence[float] | np.ndarray | None, num_tasks: int) -> np.ndarray | None:
    """Validate ``counts`` (one non-negative count per task) and return them as float64, or ``None``."""
    if counts is None:
        return None
    try:
        w = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"counts must be a sequence of numbers, got {counts!r}") from e
    if w.ndim != 1 or w.shape[0] != num_tasks:
        raise ValueError(f"counts must hold one test-sample count per task ({num_tasks} tasks), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"counts must be finite and non-negative, got {w.tolist()}")
    return w


def _row_mean(row: np.ndarray, w: np.ndarray | None, what: str) -> float:
    """Mean of ``row``: weighted by ``w[: len(row)]`` when given, else plain."""
    if w is None:
        return float(row.mean())
    ws = w[: row.shape[0]]
    total = ws.sum()
    if total <= 0:
        raise ValueError(f"counts of tasks 0..{row.shape[0] - 1} sum to 0: cannot weigh {what} by samples")
    return float((row * ws).sum() / total)


def accuracy_after(acc: Any, t: int, counts: Sequence[float] | np.ndarray | None = None) -> float:
    """``A_t``: accuracy on tasks ``0..t`` after training task ``t``.

    Sample-weighted by ``counts`` when given, else the mean over tasks. ``t`` may be negative (``-1`` = last).
    """
    rows = _rows(acc)
    w = _weights(counts, len(rows))
    if not -len(rows) <= t < len(rows):
        raise ValueError(f"task index t={t} out of range for an accuracy matrix of {len(rows)} tasks")
    return _row_mean(rows[t], w, f"A_{t}")


def final_accuracy(acc: Any, counts: Sequence[float] | np.ndarray | None = None) -> float:
    """Final accuracy ``A_{T-1}`` (sample-weighted when ``counts`` given)."""
    return accuracy_after(acc, -1, counts)


def average_accuracy(acc: Any, counts: Sequence[float] | np.ndarray | None = None) -> float:
    """Average incremental accuracy ``A_bar = (1/T) sum_t A_t`` (sample-weighted ``A_t`` when ``counts`` given)."""
    rows = _rows(acc)
    w = _weights(counts, len(rows))
    return float(np.mean([_row_mean(r, w, f"A_{t}") for t, r in enumerate(rows)]))


def forgetting_per_task(acc: Any) -> list[float]:
    """Forgetting of every task but the last, ``f_j = max_{j<=i<=T-2} (acc[i][j] - acc[T-1][j])`` for
    ``j < T-1`` (the best accuracy task ``j`` ever had before the last task minus its final accuracy); empty when
    ``T == 1``."""
    rows = _rows(acc)
    last = len(rows) - 1
    return [float(max(rows[i][j] for i in range(j, last)) - rows[last][j]) for j in range(last)]


def forgetting(acc: Any) -> float:
    """Forgetting ``F = mean_{j<T-1} max_{j<=i<=T-2} (acc[i][j] - acc[T-1][j])``; ``0.0`` when ``T == 1``."""
    drops = forgetting_per_task(acc)
    return float(np.mean(drops)) if drops else 0.0


def backward_transfer(acc: Any) -> float:
    """Backward transfer ``BWT = mean_{j<T-1} (acc[T-1][j] - acc[j][j])``; ``0.0`` when ``T == 1``."""
    rows = _rows(acc)
    last = len(rows) - 1
    if last == 0:
        return 0.0
    return float(np.mean([rows[last][j] - rows[j][j] for j in range(last)]))


def summarize(
    acc: Any,
    counts: Sequence[float] | np.ndarray | None = None,
    task_il: Any | None = None,
    task_id: Any | None = None,
) -> dict[str, float]:
    """All metrics of a run as a dict.

    Keys: ``final_accuracy`` and ``average_accuracy`` (sample-weighted when ``counts`` given, else task-averaged),
    ``final_accuracy_task_avg``, ``average_accuracy_task_avg``, ``forgetting``, ``backward_transfer``; plus
    ``task_il_accuracy`` / ``task_id_accuracy`` (final-row mean of the task-incremental / task-identification
    accuracy matrices, sample-weighted when ``counts`` given) when those matrices are given. They must cover the
    same number of tasks as ``acc``.
    """
    rows = _rows(acc)
    _weights(counts, len(rows))
    out = {
        "final_accuracy": final_accuracy(rows, counts),
        "average_accuracy": average_accuracy(rows, counts),
        "final_accuracy_task_avg": final_accuracy(rows),
        "average_accuracy_task_avg": average_accuracy(rows),
        "forgetting": forgetting(rows),
        "backward_transfer": backward_transfer(rows),
    }
    for key, other in (("task_il_accuracy", task_il), ("task_id_accuracy", task_id)):
        if other is None:
            continue
        other_rows = _rows(other, name=key.removesuffix("_accuracy"))
        if len(other_rows) != len(rows):
            raise ValueError(f"{key} matrix has {len(other_rows)} rows but acc has {len(rows)}")
        out[key] = final_accuracy(other_rows, counts)
    return out


def routing_accuracy(routing: Sequence[Sequence[int]]) -> list[float]:
    """Per true task ``i``, the share (%) of its samples a routing learner sent to task ``i``:
    ``R[i][i] / sum_j R[i][j]`` of the routing counts ``R`` (0 for a task without samples)."""
    return [100.0 * row[i] / max(sum(row), 1) for i, row in enumerate(routing)]


def routing_accuracy_overall(routing: Sequence[Sequence[int]]) -> float:
    """The share (%) of all samples sent to their own task: ``sum_i R[i][i] / sum_ij R[i][j]``."""
    return 100.0 * sum(row[i] for i, row in enumerate(routing)) / max(sum(map(sum, routing)), 1)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of ``values``, e.g. over seeds; std is 0.0 for one value."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, float(np.std(vals, ddof=1))

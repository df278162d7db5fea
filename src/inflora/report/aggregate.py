"""Aggregation over seeds: pure functions of saved results.json dictionaries (no torch, no plotting).

A *group* is one method variant (a label) and its finished runs, one per seed. Per run, the metrics are recomputed
from the saved matrices with :mod:`inflora.metrics` (so every run is summarised by the same definitions):

* ``final_accuracy`` ``A_T`` and ``average_accuracy`` ``A_bar``: accuracy over the test samples of the tasks seen
  (sample-weighted by ``test_counts``) after the last task, and its mean over the tasks;
  ``final_accuracy_task_avg`` / ``average_accuracy_task_avg`` weigh every task alike;
* ``forgetting`` ``F = mean_{j<T-1} max_{j<=i<=T-2} (a[i][j] - a[T-1][j])`` and ``backward_transfer``
  ``BWT = mean_{j<T-1} (a[T-1][j] - a[j][j])``;
* ``task_il_accuracy`` (the task's own classes only) and ``task_id_accuracy`` (is the predicted class in the right
  task) after the last task;
* ``wall_s``: seconds of all tasks' phases (begin, train, end of task, evaluation; start-up excluded), ``train_s``:
  seconds of the training loops, ``trainable_parameters``: parameters trained per task, averaged over the tasks;
* ``routing_accuracy``, only for learners that route each sample to a task (CoLoR): the share of all evaluated
  samples sent to their own task after the last task, ``sum_i R[i][i] / sum_ij R[i][j]`` of the last task's
  ``routing_matrix`` ``R``.

Over seeds, every figure is the mean and the sample standard deviation (``ddof=1``; 0 for one seed,
:func:`inflora.metrics.mean_std`). Curves, matrices and per-task figures are averaged entry by entry (task
positions: with a seeded class order, position ``j`` holds other classes in other seeds).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metrics import accuracy_after, forgetting_per_task, mean_std, routing_accuracy_overall, summarize
from ..results import SUMMARY_KEYS
from ..runtime import autocast_enabled, precision_name

TIME_KEYS = ("wall_s", "train_s")
METRIC_KEYS = (*SUMMARY_KEYS, *TIME_KEYS, "trainable_parameters", "routing_accuracy")
"""The figures of the comparison table, in order."""
PHASES = ("begin_s", "train_s", "end_s", "eval_s")
"""The phases of a task as results.json times them."""
REQUIRED = ("num_tasks", "tasks_done", "test_counts", "accuracy_matrix", "timings")


class ReportError(ValueError):
    """Results that cannot be reported: missing, unreadable, unfinished or inconsistent."""


def load_results(path: Path) -> dict[str, Any]:
    """The results.json at ``path``, checked to be a finished run."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(results, dict):
        raise ReportError(f"{path} is not a results file (not a JSON object)")
    missing = [k for k in REQUIRED if k not in results]
    if missing:
        raise ReportError(f"{path} is not a results file of inflora: missing {', '.join(missing)}")
    if not is_finished(results):
        raise ReportError(f"{path} is the results of an unfinished run ({results['tasks_done']} of "
                          f"{results['num_tasks']} tasks)")
    return results


def is_finished(results: dict[str, Any]) -> bool:
    """Whether a results dictionary holds every task of its run."""
    done, total = results.get("tasks_done"), results.get("num_tasks")
    return isinstance(done, int) and done == total and len(results.get("accuracy_matrix") or []) == done > 0


def run_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The figures of :data:`METRIC_KEYS` for one finished run (see the module docstring)."""
    acc, counts = results["accuracy_matrix"], results["test_counts"]
    extra = {k: results.get(f"{k}_matrix") or None for k in ("task_il", "task_id")}
    out = summarize(acc, counts, **extra)
    timings = results["timings"]
    out["wall_s"] = float(sum(t.get(phase, 0.0) for t in timings for phase in PHASES))
    out["train_s"] = float(sum(t.get("train_s", 0.0) for t in timings))
    trained = [d["trainable_parameters"] for d in results.get("diagnostics") or [] if "trainable_parameters" in d]
    if trained:
        out["trainable_parameters"] = float(np.mean(trained))
    routing = (results.get("diagnostics") or [{}])[-1].get("routing_matrix")
    if routing:
        out["routing_accuracy"] = routing_accuracy_overall(routing)
    return out


def curve(results: dict[str, Any]) -> list[float]:
    """``A_t`` after every task ``t`` (sample-weighted), recomputed from the saved matrix."""
    acc, counts = results["accuracy_matrix"], results["test_counts"]
    return [accuracy_after(acc, t, counts) for t in range(len(acc))]


def _mean_std_lists(rows: list[list[float]]) -> dict[str, list[float]]:
    """Entry-wise mean and sample std of equally long lists."""
    pairs = [mean_std(column) for column in zip(*rows, strict=True)]
    return {"mean": [m for m, _ in pairs], "std": [s for _, s in pairs]}


def _site_key(name: str) -> list[Any]:
    """Natural order of layer names (``blocks.2`` before ``blocks.10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def memory_dimensions(results: dict[str, Any]) -> dict[str, list[float | None]] | None:
    """Per layer (site), the dimension of the memory of old tasks' inputs after every task, from the per-task
    diagnostics: ``memory_spans`` (``{site: dimension}``) when saved, else ``memory_dims`` (``{site: [mode,
    stored columns]}``, whose dimension is known in ``basis`` mode only; ``None`` where it is not). None when the
    run saved neither (a method without such a memory)."""
    rows = []
    for d in results.get("diagnostics") or []:
        spans = d.get("memory_spans")
        if isinstance(spans, dict):
            rows.append({k: float(v) for k, v in spans.items()})
        elif isinstance(d.get("memory_dims"), dict):
            rows.append({k: float(v[1]) if v[0] == "basis" else None for k, v in d["memory_dims"].items()})
        else:
            rows.append(None)
    if not any(rows):
        return None
    sites = sorted({k for row in rows if row for k in row}, key=_site_key)
    return {site: [row.get(site) if row else None for row in rows] for site in sites}


def _mean_memory(runs: list[dict[str, Any]]) -> dict[str, list[float | None]] | None:
    """:func:`memory_dimensions` averaged over runs (an entry unknown in every run stays None)."""
    per_run = [m for m in map(memory_dimensions, runs) if m is not None]
    if not per_run:
        return None
    sites = sorted({s for m in per_run for s in m}, key=_site_key)
    out: dict[str, list[float | None]] = {}
    for site in sites:
        series = [m[site] for m in per_run if site in m]
        length = max(map(len, series))
        out[site] = []
        for t in range(length):
            known = [s[t] for s in series if t < len(s) and s[t] is not None]
            out[site].append(float(np.mean(known)) if known else None)
    return out


def run_precision(results: dict[str, Any]) -> str:
    """The precision a run computed in: ``results["precision"]``, else (results written before it was recorded)
    derived from the run's device and ``train.amp`` as the runtime decides it, else ``"unrecorded"``."""
    if "precision" in results:
        return str(results["precision"])
    amp = (results.get("config") or {}).get("train", {}).get("amp")
    try:
        return precision_name(autocast_enabled(amp, torch.device(results["device"])))
    except (KeyError, TypeError, ValueError, RuntimeError):
        return "unrecorded"


def summarize_group(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over the seeds of one variant's finished runs: the table's figures, the ``A_t`` curve, the
    accuracy matrix (lower triangle), forgetting per task, the phases' seconds per task and the memory dimensions
    per layer (when saved). Refuses runs of different lengths or a seed given twice."""
    if not runs:
        raise ReportError(f"{label}: no finished run to summarise")
    lengths = sorted({r["num_tasks"] for r in runs})
    if len(lengths) > 1:
        raise ReportError(f"{label}: its runs have different numbers of tasks ({lengths}); report them apart")
    seeds = [r.get("seed") for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ReportError(f"{label}: seed(s) given twice among its runs: {seeds}")
    runs = sorted(runs, key=lambda r: r.get("seed", 0))
    per_run = [run_metrics(r) for r in runs]
    metrics = {}
    for key in METRIC_KEYS:
        values = [m[key] for m in per_run if key in m]
        if values:
            mean, std = mean_std(values)
            metrics[key] = {"mean": mean, "std": std, "values": values}
    matrices = [r["accuracy_matrix"] for r in runs]
    num_tasks = lengths[0]
    first = runs[0]
    return {
        "label": label,
        "method": first.get("method"),
        "classifier": first.get("classifier"),
        "benchmark": first.get("benchmark"),
        "eval_split": first.get("eval_split"),
        "num_tasks": num_tasks,
        "seeds": [r.get("seed") for r in runs],
        "precision": sorted({run_precision(r) for r in runs}),
        "metrics": metrics,
        "per_seed": [{"seed": r.get("seed"), **m} for r, m in zip(runs, per_run, strict=True)],
        "accuracy_after_task": _mean_std_lists([curve(r) for r in runs]),
        "accuracy_matrix": [_mean_std_lists([m[i][: i + 1] for m in matrices])["mean"] for i in range(num_tasks)],
        "forgetting_per_task": _mean_std_lists([forgetting_per_task(m) for m in matrices])
        if num_tasks > 1 else {"mean": [], "std": []},
        "time_per_task": {phase: _mean_std_lists([[t.get(phase, 0.0) for t in r["timings"]] for r in runs])["mean"]
                          for phase in PHASES},
        "memory_dimensions": _mean_memory(runs),
        "config": first.get("config"),
    }


def aggregate(groups: dict[str, list[dict[str, Any]]], missing: dict[str, list[int]] | None = None
              ) -> dict[str, Any]:
    """The comparison of every group (label -> finished runs, in the order given): ``methods`` (each group's
    :func:`summarize_group`), ``missing`` (label -> seeds without a finished run) and the metric keys."""
    methods = [summarize_group(label, runs) for label, runs in groups.items() if runs]
    if not methods:
        raise ReportError("no finished run to report")
    missing = {k: list(v) for k, v in (missing or {}).items() if v}
    return {"metric_keys": list(METRIC_KEYS), "methods": methods, "missing": missing}

"""Writing results (JSON, YAML config, summaries) and the readable tables the CLI prints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .metrics import accuracy_after, mean_std, summarize

SUMMARY_KEYS = ("final_accuracy", "average_accuracy", "final_accuracy_task_avg", "average_accuracy_task_avg",
                "forgetting", "backward_transfer", "task_il_accuracy", "task_id_accuracy", "final_feature_drift")


@dataclass
class RunState:
    """Everything a run has produced so far (what a checkpoint holds besides tensors): per finished task, the rows
    of the accuracy matrices, the timings and the learner's diagnostics."""

    tasks_done: int = 0
    accuracy: list[list[float]] = field(default_factory=list)
    task_il: list[list[float]] = field(default_factory=list)
    task_id: list[list[float]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    feature_drift: list[list[float | None] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        # a run state saved before the drift meter existed: its tasks have no drift row
        self.feature_drift = [None] * (self.tasks_done - len(self.feature_drift)) + list(self.feature_drift)

    def add_task(self, row: list[float], til: list[float], tid: list[float], timings: dict[str, float],
                 diagnostics: dict[str, Any], drift: list[float | None] | None = None) -> None:
        """Record a finished task: its accuracy rows, timings, the learner's diagnostics and the feature-drift
        row (:class:`inflora.drift.FeatureProbe`; None when not measured)."""
        self.accuracy.append(row)
        self.task_il.append(til)
        self.task_id.append(tid)
        self.timings.append(timings)
        self.diagnostics.append(diagnostics)
        self.feature_drift.append(drift)
        self.tasks_done += 1


def final_drift(matrix: list[list[float | None] | None]) -> float | None:
    """Mean feature drift of the old tasks after the last task (None: not measured, or no old task)."""
    last = matrix[-1] if matrix else None
    values = [v for v in (last or [])[:-1] if v is not None]
    return sum(values) / len(values) if values else None


def build_results(state: RunState, counts: list[int], header: dict[str, Any]) -> dict[str, Any]:
    """The results dictionary of a run: ``header`` (method, benchmark, seed, ...), the matrices, the summary
    metrics (:func:`inflora.metrics.summarize`), accuracy after each task, the feature-drift matrix (rows like the
    accuracy matrix's; None when not measured) and its final old-task mean, timings and diagnostics."""
    counts = counts[: state.tasks_done]
    s = state
    summary = summarize(s.accuracy, counts, task_il=s.task_il, task_id=s.task_id) if s.accuracy else {}
    header = dict(header)
    config = header.pop("config", None)
    return {
        **header,
        "tasks_done": s.tasks_done,
        "test_counts": counts,
        "accuracy_matrix": s.accuracy,
        "task_il_matrix": s.task_il,
        "task_id_matrix": s.task_id,
        **summary,
        "accuracy_after_task": [accuracy_after(s.accuracy, t, counts) for t in range(s.tasks_done)],
        "feature_drift_matrix": s.feature_drift if any(r is not None for r in s.feature_drift) else None,
        "final_feature_drift": final_drift(s.feature_drift),
        "timings": s.timings,
        "diagnostics": s.diagnostics,
        "config": config,
    }


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def seeds_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of every summary metric."""
    out: dict[str, Any] = {"method": results[0]["method"], "benchmark": results[0]["benchmark"],
                           "seeds": [r["seed"] for r in results]}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            mean, std = mean_std(values)
            out[key] = {"mean": mean, "std": std, "values": values}
    return out


def format_table(results: dict[str, Any]) -> str:
    """The accuracy matrix and the metrics of one run as text."""
    lines = [f"{results['benchmark']} | method {results['method']} | seed {results['seed']} | "
             f"{results['tasks_done']}/{results['num_tasks']} tasks | {results['eval_split']} split"]
    width = results["tasks_done"]
    header = "after task | " + " ".join(f"T{j + 1:>5}" for j in range(width)) + " |    A_t"
    lines += [header, "-" * len(header)]
    for i, row in enumerate(results["accuracy_matrix"]):
        cells = " ".join(f"{a:6.1f}" for a in row) + " " * 7 * (width - len(row))
        lines.append(f"{i + 1:>10} | {cells} | {results['accuracy_after_task'][i]:6.2f}")
    drift = results.get("feature_drift_matrix")
    if drift:
        lines += ["", "feature drift (mean relative change of the probe samples' features since their task was learnt)"]
        lines += matrix_lines(drift, width)
    per_old = [d.get("per_old_task", {}) for d in results.get("diagnostics", [])]
    for key in sorted({k for figures in per_old for k in figures}):
        lines += ["", f"{key} (learner diagnostics, per old task)"]
        lines += matrix_lines([figures.get(key) for figures in per_old], width)
    timings = results["timings"]
    train = sum(t["train_s"] for t in timings)
    overhead = sum(d.get("method_s", 0.0) for d in results.get("diagnostics", []))
    lines.append("")
    lines.append(f"final accuracy A_T      {results.get('final_accuracy', float('nan')):6.2f}   "
                 f"(task-averaged {results.get('final_accuracy_task_avg', float('nan')):.2f})")
    lines.append(f"average accuracy A_bar  {results.get('average_accuracy', float('nan')):6.2f}   "
                 f"(task-averaged {results.get('average_accuracy_task_avg', float('nan')):.2f})")
    lines.append(f"forgetting              {results.get('forgetting', float('nan')):6.2f}   "
                 f"backward transfer {results.get('backward_transfer', float('nan')):.2f}")
    lines.append(f"task-IL accuracy        {results.get('task_il_accuracy', float('nan')):6.2f}   "
                 f"task-id accuracy {results.get('task_id_accuracy', float('nan')):.2f}")
    share = f"{100 * overhead / train:.1f}% of training" if train > 0 else "n/a"
    lines.append(f"time: training {train:.1f}s, method-specific work {overhead:.1f}s ({share}), end of task "
                 f"{sum(t['end_s'] for t in timings):.1f}s, evaluation {sum(t['eval_s'] for t in timings):.1f}s")
    return "\n".join(lines)


def matrix_lines(rows: list[list[float | None] | None], width: int) -> list[str]:
    """Rows of per-old-task figures (``None``: not measured) as a lower-triangular table like the accuracy's."""
    header = "after task | " + " ".join(f"T{j + 1:>5}" for j in range(width))
    lines = [header, "-" * len(header)]
    for i, row in enumerate(rows):
        cells = " ".join("     -" if v is None else f"{v:6.3f}" for v in (row or []))
        lines.append(f"{i + 1:>10} | {cells if row is not None else '(not measured)'}")
    return lines


def format_seeds(summary: dict[str, Any]) -> str:
    lines = [f"{summary['benchmark']} | method {summary['method']} | seeds {summary['seeds']}"]
    for key in SUMMARY_KEYS:
        if key in summary:
            lines.append(f"{key:<26} {summary[key]['mean']:6.2f} +- {summary[key]['std']:.2f}")
    return "\n".join(lines)

"""The comparison as tables: ``comparison.md`` (mean ± std per method), ``comparison.csv`` (one row per method, a
mean and a std column per figure) and ``comparison.json`` (the whole aggregate, per-seed figures included)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..results import atomic_write_text, write_json
from ..runfolder import REPORT_FILES

MD_FILE, CSV_FILE, JSON_FILE, HTML_FILE = REPORT_FILES
COLUMNS = {
    "final_accuracy": "A_T",
    "average_accuracy": "A_bar",
    "forgetting": "forgetting",
    "backward_transfer": "BWT",
    "task_il_accuracy": "task-IL",
    "task_id_accuracy": "task-id",
    "wall_s": "time (s)",
    "train_s": "train (s)",
    "trainable_parameters": "trainable/task",
}
"""The figures the markdown and HTML tables show, with their headings (the CSV and JSON hold every figure)."""


def cell(figure: dict[str, float] | None, key: str) -> str:
    """``mean ± std`` of one figure, formatted for its kind (counts as integers, seconds and percents with one or
    two decimals); an empty cell when the figure is missing."""
    if figure is None:
        return ""
    mean, std = figure["mean"], figure["std"]
    if key == "trainable_parameters":
        return f"{mean:,.0f}" if std == 0 else f"{mean:,.0f} ± {std:,.0f}"
    digits = 1 if key.endswith("_s") else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(comparison: dict[str, Any]) -> list[list[str]]:
    """Heading and one row per method: label, seeds, then the :data:`COLUMNS` figures."""
    rows = [["method", "seeds", *COLUMNS.values()]]
    for m in comparison["methods"]:
        seeds = ",".join(map(str, m["seeds"]))
        missing = comparison["missing"].get(m["label"])
        if missing:
            seeds += f" (missing {','.join(map(str, missing))})"
        rows.append([m["label"], seeds, *(cell(m["metrics"].get(k), k) for k in COLUMNS)])
    return rows


def _partial(method: dict[str, Any], key: str) -> str:
    """`` (N of M seeds)`` when only some of a method's runs record figure ``key`` (older runs), else empty."""
    have, runs = len(method["metrics"][key]["values"]), len(method["seeds"])
    return f" ({have} of {runs} seeds)" if have < runs else ""


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as a markdown document: the benchmark line, the table and the figures' definitions."""
    first = comparison["methods"][0]
    rows = table_rows(comparison)
    lines = [f"# {first['benchmark']}: {len(comparison['methods'])} methods, mean ± std over seeds "
             f"({first['eval_split']} split)", ""]
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(rows[0]) - 2)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    only = [label for label in comparison["missing"] if label not in {m["label"] for m in comparison["methods"]}]
    if only:
        lines += ["", f"No finished run yet: {', '.join(only)}."]
    key = "routing_accuracy"
    routed = [f"{m['label']} {cell(m['metrics'][key], key)}{_partial(m, key)}"
              for m in comparison["methods"] if key in m["metrics"]]
    if routed:
        lines += ["", "Routing accuracy after the last task (evaluated samples sent to their own task): "
                  f"{', '.join(routed)}."]
    warning = precision_warning(comparison)
    if warning:
        lines += ["", f"**{warning}**"]
    lines += ["", "A_T: accuracy on all seen test samples after the last task; A_bar: mean of A_t over tasks; "
              "forgetting: mean drop from each old task's best accuracy; BWT: mean change of each old task's accuracy "
              "since it was learnt; task-IL: accuracy among the task's own classes; task-id: predicted class in the "
              "right task; time: all tasks' phases (start-up excluded); train: training loops; trainable/task: "
              "parameters trained per task (mean over tasks).", ""]
    return "\n".join(lines)


def precision_warning(comparison: dict[str, Any]) -> str | None:
    """A warning when the runs were not all computed in one precision (see ``aggregate.run_precision``): mixed
    precisions make the rows not comparable. None when they agree."""
    kinds = {m["label"]: m.get("precision", ["unrecorded"]) for m in comparison["methods"]}
    if len({p for ps in kinds.values() for p in ps}) <= 1:
        return None
    listed = "; ".join(f"{label}: {', '.join(ps)}" for label, ps in kinds.items())
    return f"Warning: the runs were computed in different precisions ({listed}); see docs/precision.md."


def csv_text(comparison: dict[str, Any]) -> str:
    """One row per method: label, method, classifier, seeds, then ``KEY_mean`` and ``KEY_std`` of every figure."""
    keys = comparison["metric_keys"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "method", "classifier", "seeds", *(f"{k}_{s}" for k in keys for s in ("mean", "std"))])
    for m in comparison["methods"]:
        figures = [m["metrics"].get(k, {}).get(s, "") for k in keys for s in ("mean", "std")]
        writer.writerow([m["label"], m["method"], m["classifier"], " ".join(map(str, m["seeds"])), *figures])
    return buffer.getvalue()


def write_tables(comparison: dict[str, Any], folder: Path) -> list[Path]:
    """Write comparison.md, .csv and .json into ``folder``; returns their paths."""
    folder = Path(folder)
    paths = [folder / MD_FILE, folder / CSV_FILE, folder / JSON_FILE]
    atomic_write_text(paths[0], markdown(comparison))
    atomic_write_text(paths[1], csv_text(comparison))
    write_json(paths[2], comparison)
    return paths

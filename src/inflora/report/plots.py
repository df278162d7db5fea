"""The report's figures, one PNG each, drawn headless with matplotlib's Agg canvas (no pyplot, no display) from an
aggregate (:func:`inflora.report.aggregate.aggregate`):

* ``accuracy_curves.png``: ``A_t`` after every task, per method, mean line and a ±1 std band over seeds;
* ``final_accuracy.png``: ``A_T`` per method, mean and std over seeds;
* ``heatmap-LABEL.png``: the accuracy matrix of a method (row: after task i, column: task j), mean over seeds;
* ``forgetting_per_task.png``: each old task's forgetting ``max_i a[i][j] - a[T-1][j]``, per method;
* ``memory-LABEL.png``: the dimension of the old tasks' input memory per layer after every task (InfLoRA's Fig. 5),
  for methods whose runs saved it;
* ``time_per_task.png``: seconds per task split into begin, training, end of task and evaluation, per method.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..runfolder import FIGURE_FILE, FIGURES
from .aggregate import PHASES, ReportError

PHASE_NAMES = {"begin_s": "begin", "train_s": "training", "end_s": "end of task", "eval_s": "evaluation"}
DPI = 110


def require_matplotlib() -> None:
    """Refuse to start a report (or a comparison that ends with one) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ReportError(f"the report's figures need matplotlib ({exc}): pip install matplotlib") from None


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, folder: Path, name: str) -> Path:
    if not FIGURE_FILE.fullmatch(name):
        raise ReportError(f"figure name {name!r} is not one the report writes (labels: letters, digits, ._=+-)")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fig.savefig(path, format="png")
    return path


def _integer_ticks(ax: Any) -> None:
    """Task numbers on the x axis: integers only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def accuracy_curves(comparison: dict[str, Any], folder: Path) -> Path:
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    for m, colour in zip(comparison["methods"], _colours(len(comparison["methods"])), strict=True):
        mean, std = m["accuracy_after_task"]["mean"], m["accuracy_after_task"]["std"]
        tasks = list(range(1, len(mean) + 1))
        ax.plot(tasks, mean, marker="o", markersize=3, color=colour, label=f"{m['label']} (n={len(m['seeds'])})")
        ax.fill_between(tasks, [a - s for a, s in zip(mean, std, strict=True)],
                        [a + s for a, s in zip(mean, std, strict=True)], color=colour, alpha=0.18, linewidth=0)
    ax.set(xlabel="after task", ylabel="accuracy on the tasks so far A_t (%)", title="Accuracy after each task")
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder, "accuracy_curves.png")


def final_accuracy(comparison: dict[str, Any], folder: Path) -> Path:
    methods = comparison["methods"]
    fig = _figure(max(4.0, 0.9 * len(methods) + 2), 3.8)
    ax = fig.add_subplot()
    means = [m["metrics"]["final_accuracy"]["mean"] for m in methods]
    stds = [m["metrics"]["final_accuracy"]["std"] for m in methods]
    bars = ax.bar(range(len(methods)), means, yerr=stds, capsize=4, color=_colours(len(methods)))
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in means], padding=2, fontsize=8)
    ax.set_xticks(range(len(methods)), [m["label"] for m in methods], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="A_T (%)", title="Final accuracy (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, "final_accuracy.png")


def heatmap(method: dict[str, Any], folder: Path) -> Path:
    import numpy as np

    rows = method["accuracy_matrix"]
    t = len(rows)
    grid = np.full((t, t), np.nan)
    for i, row in enumerate(rows):
        grid[i, : len(row)] = row
    size = min(10.0, 2.5 + 0.45 * t)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    if t <= 15:
        for i in range(t):
            for j in range(i + 1):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 60 else "black")
    ticks = range(t)
    ax.set_xticks(ticks, [str(j + 1) for j in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(i + 1) for i in ticks], fontsize=7)
    ax.set(xlabel="accuracy on task j", ylabel="after task i",
           title=f"{method['label']}: accuracy matrix (mean of {len(method['seeds'])} seed(s))")
    return _save(fig, folder, f"heatmap-{method['label']}.png")


def forgetting_per_task(comparison: dict[str, Any], folder: Path) -> Path | None:
    methods = [m for m in comparison["methods"] if m["forgetting_per_task"]["mean"]]
    if not methods:
        return None
    longest = max(len(m["forgetting_per_task"]["mean"]) for m in methods)
    fig = _figure(max(6.0, 0.35 * longest * len(methods) + 2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for k, (m, colour) in enumerate(zip(methods, _colours(len(methods)), strict=True)):
        mean, std = m["forgetting_per_task"]["mean"], m["forgetting_per_task"]["std"]
        xs = [j + 1 - 0.4 + width * (k + 0.5) for j in range(len(mean))]
        ax.bar(xs, mean, width=width, yerr=std, capsize=2, color=colour, label=m["label"])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(1, longest + 1))
    ax.set(xlabel="task j", ylabel="forgetting (points)", title="Forgetting per task: best earlier accuracy - final")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, folder, "forgetting_per_task.png")


def memory(method: dict[str, Any], folder: Path) -> Path | None:
    dims = method["memory_dimensions"]
    if not dims:
        return None
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    colours = _colours(len(dims))
    for (site, series), colour in zip(dims.items(), colours, strict=True):
        tasks = [t + 1 for t, v in enumerate(series) if v is not None]
        ax.plot(tasks, [v for v in series if v is not None], marker="o", markersize=2, color=colour, label=site)
    if len(dims) <= 16:
        ax.legend(fontsize=6, ncols=2 if len(dims) > 8 else 1)
    else:
        ax.text(0.01, 0.98, f"{len(dims)} layers, colour from first to last", transform=ax.transAxes, va="top",
                fontsize=8)
    ax.set(xlabel="after task", ylabel="dimension of the memory",
           title=f"{method['label']}: memory of old tasks' inputs per layer")
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    return _save(fig, folder, f"memory-{method['label']}.png")


def time_per_task(comparison: dict[str, Any], folder: Path) -> Path:
    methods = comparison["methods"]
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    colours = _colours(len(PHASES))
    for k, ax in enumerate(axes.flat):
        if k >= len(methods):
            ax.set_visible(False)
            continue
        m = methods[k]
        bottom = [0.0] * m["num_tasks"]
        tasks = range(1, m["num_tasks"] + 1)
        for phase, colour in zip(PHASES, colours, strict=True):
            values = m["time_per_task"][phase]
            ax.bar(tasks, values, bottom=bottom, color=colour, label=PHASE_NAMES[phase])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set(title=m["label"], xlabel="task")
        _integer_ticks(ax)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("seconds (mean over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Time per task")
    return _save(fig, folder, "time_per_task.png")


def draw_all(comparison: dict[str, Any], folder: Path) -> list[tuple[str, Path]]:
    """Every figure of the comparison into ``folder/figures``; returns ``(title, path)`` in report order."""
    require_matplotlib()
    out = Path(folder) / FIGURES
    figures: list[tuple[str, Path | None]] = [
        ("Accuracy after each task", accuracy_curves(comparison, out)),
        ("Final accuracy", final_accuracy(comparison, out)),
        ("Forgetting per task", forgetting_per_task(comparison, out)),
        ("Time per task", time_per_task(comparison, out)),
    ]
    figures += [(f"Accuracy matrix: {m['label']}", heatmap(m, out)) for m in comparison["methods"]]
    figures += [(f"Memory dimensions: {m['label']}", memory(m, out)) for m in comparison["methods"]]
    drawn = [(title, path) for title, path in figures if path is not None]
    keep = {path.name for _, path in drawn}
    for stale in out.iterdir():  # an earlier report's figures of methods no longer in it
        if stale.name not in keep and FIGURE_FILE.fullmatch(stale.name) and stale.is_file() and not stale.is_symlink():
            stale.unlink()
    return drawn

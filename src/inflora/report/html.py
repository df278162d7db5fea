"""``report.html``: one self-contained page (no file or network reference) with the comparison table, every figure
embedded as a base64 PNG, the per-seed figures and the resolved configuration of every method."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

import yaml

from ..results import atomic_write_text
from .tables import COLUMNS, HTML_FILE, cell, precision_warning, table_rows

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.note { color: #a33; }
"""
CAPTIONS = {
    "Accuracy after each task": "A_t: accuracy on the test samples of every task seen so far, after each task; line: "
                                "mean over seeds, band: ±1 standard deviation.",
    "Final accuracy": "A_T after the last task, mean and standard deviation over seeds.",
    "Forgetting per task": "For each old task j: its best accuracy before the last task minus its final accuracy.",
    "Time per task": "Seconds per task split into begin (e.g. statistics and design), training, end of task (e.g. "
                     "memory update, classifier alignment) and evaluation; mean over seeds.",
    "Accuracy matrix": "Row i: accuracy on every task j after training task i (mean over seeds).",
    "Memory dimensions": "Dimension of the memory of old tasks' inputs per layer after every task (mean over seeds).",
}


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{escape(path.stem)}" src="data:image/png;base64,{data}">'


def _per_seed(method: dict[str, Any]) -> str:
    rows = [["seed", "", *COLUMNS.values()]]
    for run in method["per_seed"]:
        figures = {k: {"mean": run[k], "std": 0.0} for k in COLUMNS if k in run}
        rows.append([str(run["seed"]), "", *(cell(figures.get(k), k).split(" ±")[0] for k in COLUMNS)])
    return _table(rows)


def render(comparison: dict[str, Any], figures: list[tuple[str, Path]], title: str) -> str:
    """The page's HTML for ``comparison`` and its figures ``(title, png path)``."""
    first = comparison["methods"][0]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>",
             f"<p>Benchmark <b>{escape(str(first['benchmark']))}</b>, {first['num_tasks']} tasks, evaluated on the "
             f"{escape(str(first['eval_split']))} split; mean ± standard deviation over seeds.</p>",
             _table(table_rows(comparison))]
    if comparison["missing"]:
        missing = "; ".join(f"{escape(k)}: seeds {', '.join(map(str, v))}" for k, v in comparison["missing"].items())
        parts.append(f"<p class='note'>Without a finished run (not in the figures): {missing}.</p>")
    warning = precision_warning(comparison)
    if warning:
        parts.append(f"<p class='note'>{escape(warning)}</p>")
    parts.append("<h2>Figures</h2>")
    for name, path in figures:
        caption = CAPTIONS.get(name.split(":")[0], "")
        parts.append(f"<figure>{_image(path)}<figcaption><b>{escape(name)}.</b> {escape(caption)}</figcaption>"
                     "</figure>")
    parts.append("<h2>Runs per seed</h2>")
    for m in comparison["methods"]:
        parts += [f"<h3>{escape(m['label'])}</h3>", _per_seed(m)]
    parts.append("<h2>Resolved configurations</h2>")
    for m in comparison["methods"]:
        config = yaml.safe_dump(m["config"], sort_keys=False) if m["config"] is not None else "(not saved)"
        parts.append(f"<details><summary>{escape(m['label'])} (method {escape(str(m['method']))}, classifier "
                     f"{escape(str(m['classifier']))}; the seed varies over runs)</summary><pre>{escape(config)}</pre>"
                     "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(comparison: dict[str, Any], figures: list[tuple[str, Path]], folder: Path, title: str) -> Path:
    """Write ``folder/report.html``; returns its path."""
    path = Path(folder) / HTML_FILE
    atomic_write_text(path, render(comparison, figures, title))
    return path

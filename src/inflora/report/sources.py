"""Where a report's runs are: a comparison folder (its manifest ``compare.json`` and ``LABEL/seed_N`` run folders),
a multi-seed run folder (``seed_N/``) or a single run folder; and writing the whole report from them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..results import write_json
from ..runfolder import SEED_DIR
from .aggregate import ReportError, aggregate, is_finished, load_results
from .html import write_html
from .plots import draw_all
from .tables import write_tables

log = logging.getLogger("inflora")

MANIFEST = "compare.json"
RESULTS = "results.json"
MANIFEST_FORMAT = 1


def write_manifest(folder: Path, preset: str | None, seeds: list[int], common: list[str],
                   variants: list[dict[str, Any]]) -> None:
    """``folder/compare.json``: the preset, seeds, common overrides and variants (label, method, overrides) of the
    latest ``inflora compare`` into ``folder``; the report reads its labels, order and expected seeds from it."""
    write_json(Path(folder) / MANIFEST, {"format": MANIFEST_FORMAT, "preset": preset, "seeds": seeds,
                                         "common": common, "variants": variants})


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ReportError(f"{path} is not a comparison manifest of this inflora (format {MANIFEST_FORMAT})")
    return manifest


def seed_folder(folder: Path, label: str, seed: int) -> Path:
    """The run folder of one (variant, seed) job of a comparison."""
    return Path(folder) / label / f"seed_{seed}"


def _finished(path: Path) -> dict[str, Any] | None:
    """The finished results at ``path``, None when there are none yet (a run not finished, or not started)."""
    if not path.is_file():
        return None
    try:
        return load_results(path)
    except ReportError as exc:
        if "unfinished" in str(exc):
            return None
        raise


def _seed_runs(folder: Path) -> dict[int, dict[str, Any] | None]:
    """``seed -> finished results (None: not finished)`` of the ``seed_N`` folders of ``folder``."""
    found = {}
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        if SEED_DIR.fullmatch(child.name) and child.is_dir():
            found[int(child.name[5:])] = _finished(child / RESULTS)
    return found


def collect(folder: Path) -> tuple[str, dict[str, list[dict[str, Any]]], dict[str, list[int]]]:
    """The runs under ``folder``: a title, ``label -> finished results`` (report order) and ``label -> seeds
    without finished results``. A comparison folder (``compare.json``, else ``LABEL/seed_N/results.json``
    folders), a run folder with ``seed_N`` folders, or one run folder (labelled by the folder's name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder")
    groups: dict[str, list[dict[str, Any]]] = {}
    missing: dict[str, list[int]] = {}
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        for variant in manifest["variants"]:
            label = variant["label"]
            runs = {seed: _finished(seed_folder(folder, label, seed) / RESULTS) for seed in manifest["seeds"]}
            groups[label] = [r for r in runs.values() if r is not None]
            missing[label] = [s for s, r in runs.items() if r is None]
        return f"Comparison in {folder.name}", groups, missing
    if (folder / RESULTS).is_file():
        return f"Run {folder.name}", {folder.name: [load_results(folder / RESULTS)]}, {}
    seeds = _seed_runs(folder)
    if seeds:
        groups[folder.name] = [r for r in seeds.values() if r is not None]
        missing[folder.name] = [s for s, r in seeds.items() if r is None]
        return f"Run {folder.name}", groups, missing
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        seeds = _seed_runs(child)
        if seeds:
            groups[child.name] = [r for r in seeds.values() if r is not None]
            missing[child.name] = [s for s, r in seeds.items() if r is None]
    if not groups:
        raise ReportError(f"{folder} holds no results.json: not a run folder (results.json, seed_N/results.json) nor "
                          "a comparison folder (compare.json, LABEL/seed_N/results.json)")
    return f"Comparison in {folder.name}", groups, missing


def write_report(groups: dict[str, list[dict[str, Any]]], missing: dict[str, list[int]], out: Path,
                 title: str) -> list[Path]:
    """Aggregate ``groups`` and write the tables, the figures and report.html into ``out``; returns the paths."""
    comparison = aggregate(groups, missing)
    for label, runs in groups.items():
        if not runs:
            log.warning("%s: no finished run yet, left out of the report", label)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = write_tables(comparison, out)
    figures = draw_all(comparison, out)
    html = write_html(comparison, figures, out, title)
    return [*tables, *(path for _, path in figures), html]


def is_finished_run(folder: Path) -> bool:
    """Whether ``folder`` holds the results.json of a finished run."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        return False
    try:
        return is_finished(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False

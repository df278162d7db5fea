"""A fingerprint of the data a scenario feeds a run, so that a run is never resumed on other data.

It holds the dataset's name, the class names in the scenario's order, per task the number of classes and of
samples per split, and per split a SHA-256 of the scenario's samples (their labels and contents): the text of text
samples, the bytes of in-memory images, and for image files their paths relative to the split's common folder plus
their sizes (cheap: no image is opened). Where the data lives does not enter it: the same data moved elsewhere has
the same fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .base import ContinualDataset, ImageFileSplit, ListSplit, Split, SubsetSplit
from .scenarios import Scenario

__all__ = ["fingerprint_differences", "scenario_fingerprint"]


def _update_items(h: Any, split: Split, indices: Sequence[int]) -> None:
    if isinstance(split, SubsetSplit):
        _update_items(h, split.parent, [split.indices[i] for i in indices])
    elif isinstance(split, ImageFileSplit):
        paths = split.paths
        try:
            root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
        except ValueError:  # absolute and relative paths mixed, or several drives
            root = ""
        for i in indices:
            try:
                size = os.stat(paths[i]).st_size
            except OSError:
                size = -1
            h.update(f"{os.path.relpath(paths[i], root) if root else paths[i]}\0{size}\n".encode())
    elif isinstance(split, ListSplit):
        items = split.items
        if isinstance(items, np.ndarray):
            chunk = np.ascontiguousarray(items[np.asarray(indices, dtype=np.int64)])
            h.update(f"{chunk.dtype}{chunk.shape}".encode())
            h.update(chunk.tobytes())
            return
        for i in indices:
            x = items[i]
            if isinstance(x, str):
                h.update(x.encode("utf-8") + b"\0")
            elif isinstance(x, Image.Image):
                h.update(f"{x.mode}{x.size}".encode() + x.tobytes())
            else:
                arr = np.ascontiguousarray(np.asarray(x))
                h.update(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes())
    else:  # a split type of its own: its labels only
        h.update(f"{type(split).__name__}\0{len(split)}".encode())


def split_digest(split: Split, indices: Sequence[int]) -> str:
    """SHA-256 of the labels and contents of ``split``'s samples at ``indices``."""
    h = hashlib.sha256()
    h.update(np.asarray([split.labels[i] for i in indices], dtype=np.int64).tobytes())
    _update_items(h, split, indices)
    return h.hexdigest()


def scenario_fingerprint(dataset: ContinualDataset, scenario: Scenario) -> dict[str, Any]:
    """The fingerprint (JSON-ready) of the data ``scenario`` cuts from ``dataset``."""
    splits = dataset.splits()
    tasks = []
    for task in scenario.tasks:
        entry: dict[str, Any] = {"classes": len(task.classes)}
        for name in splits:
            indices = getattr(task, f"{name}_indices")
            if indices is not None:
                entry[name] = len(indices)
        if task.domain is not None and dataset.domain_names is not None:
            entry["domain"] = dataset.domain_names[task.domain]
        tasks.append(entry)
    contents = {}
    for name, split in splits.items():
        used = sorted({i for task in scenario.tasks for i in (getattr(task, f"{name}_indices") or [])})
        contents[name] = split_digest(split, used)
    return {"dataset": dataset.name, "modality": dataset.modality, "kind": scenario.kind,
            "class_names": [dataset.class_names[c] for c in scenario.class_order], "tasks": tasks,
            "contents": contents}


def _short(names: list[Any]) -> str:
    return repr(names) if len(names) <= 6 else f"{names[:6]!r}... ({len(names)} in all)"


def fingerprint_differences(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty: the same data)."""
    out = []
    for key in ("dataset", "modality", "kind"):
        if saved.get(key) != mine.get(key):
            out.append(f"{key}: checkpoint {saved.get(key)!r}, now {mine.get(key)!r}")
    theirs, ours = saved.get("class_names", []), mine.get("class_names", [])
    if theirs != ours:
        what = "order" if sorted(theirs) == sorted(ours) else "names"
        out.append(f"class {what}: checkpoint {_short(theirs)}, now {_short(ours)}")
    saved_tasks, my_tasks = saved.get("tasks", []), mine.get("tasks", [])
    if len(saved_tasks) != len(my_tasks):
        out.append(f"tasks: checkpoint {len(saved_tasks)}, now {len(my_tasks)}")
    for t, (a, b) in enumerate(zip(saved_tasks, my_tasks, strict=False)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                what = "classes" if key in ("classes", "domain") else f"{key} samples"
                out.append(f"task {t + 1} {what}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    saved_contents, my_contents = saved.get("contents", {}), mine.get("contents", {})
    changed = [k for k in sorted(set(saved_contents) | set(my_contents)) if saved_contents.get(k) != my_contents.get(k)]
    if changed:
        out.append(f"contents of the {', '.join(changed)} samples differ (labels, texts, or image files' names and "
                   "sizes)")
    return out

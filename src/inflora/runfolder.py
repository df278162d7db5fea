"""The run folder: what inflora writes into it, and removing exactly that.

``--overwrite`` and a fresh start remove only files inflora wrote, recognised by their exact names (``results.json``,
``config.yaml``, ``run.log``, ``summary.json``, the report's ``comparison.{md,csv,json}`` and ``report.html``,
``seed_N/`` run folders, inside ``checkpoints/``: ``latest``, ``task_NNN/{state.json,tensors.safetensors}``,
``.tmp-task_NNN-PID/`` and the temporary files of atomic writes; the report's figures in ``figures/`` and
TensorBoard's ``events.out.tfevents.*`` files in ``tensorboard/``).
Anything else stays, and a folder that still holds something else stays too. Nothing is ever followed through a
symlink: a ``checkpoints`` link, or a ``checkpoints`` folder that resolves outside the run folder, is refused.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
CONFIG_FILE = "config.yaml"
REPORT_FILES = ("comparison.md", "comparison.csv", "comparison.json", "report.html")
"""What ``inflora report`` (and ``inflora compare``) write beside the runs."""
RUN_FILES = ("results.json", CONFIG_FILE, "run.log", "summary.json", ".write-test", *REPORT_FILES)
FIGURES = "figures"
FIGURE_FILE = re.compile(r"(accuracy_curves|final_accuracy|forgetting_per_task|time_per_task"
                         r"|(heatmap|memory)-[A-Za-z0-9][A-Za-z0-9._=+-]*)\.png")
"""The report's figures (``figures/NAME.png``); report modules name their files through it."""
TENSORBOARD = "tensorboard"
EVENT_FILE = re.compile(r"events\.out\.tfevents\.[^/]+")
TASK_DIR = re.compile(r"task_\d+")
TMP_TASK_DIR = re.compile(r"\.tmp-task_\d+-\d+")
SEED_DIR = re.compile(r"seed_-?\d+")


def _atomic_tmp(name: str) -> re.Pattern[str]:
    """The temporary file of ``results.atomic_write_text`` for ``name``."""
    return re.compile(rf"\.{re.escape(name)}\.tmp\d+")


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_plain_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def checkpoints_dir(out: Path) -> Path:
    """``out/checkpoints``; refuses a symlink, a non-folder, or a folder that resolves outside ``out``."""
    out = Path(out)
    root = out / CHECKPOINTS
    if root.is_symlink():
        raise ConfigError(f"{root} is a symlink (to {os.readlink(root)}): inflora never reads, writes or deletes "
                          "checkpoints through a symlink; remove the link or choose another --out")
    if root.exists():
        if not root.is_dir():
            raise ConfigError(f"{root} exists and is not a folder: move it away or choose another --out")
        if not root.resolve().is_relative_to(out.resolve()):
            raise ConfigError(f"{root} resolves to {root.resolve()}, outside the run folder {out}: move it away or "
                              "choose another --out")
    return root


def check_run_folder(out: Path) -> None:
    """Refuse (before anything is built or deleted) a run folder, or a ``seed_N`` folder in it, whose checkpoints
    are a symlink or lead outside it."""
    for folder in _run_folders(out):
        checkpoints_dir(folder)


def _run_folders(out: Path) -> list[Path]:
    """``out`` and its ``seed_N`` run folders, seed folders first (plain folders only, never through a symlink;
    none when ``out`` is not a plain folder)."""
    out = Path(out)
    if not _is_plain_dir(out):
        return []
    return [*(c for c in out.iterdir() if SEED_DIR.fullmatch(c.name) and _is_plain_dir(c)), out]


def remove_checkpoint_folder(folder: Path) -> bool:
    """Remove a ``task_NNN`` (or temporary) checkpoint folder: its two files, then the folder if nothing else is in
    it. Never follows a symlink. Returns whether the folder is gone."""
    if folder.is_symlink() or not folder.exists():
        return not folder.exists() and not folder.is_symlink()
    if not folder.is_dir():
        return False
    for name in (STATE_FILE, TENSOR_FILE):
        if _is_plain_file(folder / name):
            (folder / name).unlink()
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _remove_if_ours(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if _is_plain_file(folder / name):
            (folder / name).unlink()
    tmps = [_atomic_tmp(name) for name in names]
    for child in folder.iterdir():
        if _is_plain_file(child) and any(t.fullmatch(child.name) for t in tmps):
            child.unlink()


def _remove_matching(folder: Path, pattern: re.Pattern[str]) -> None:
    """Remove the plain files of ``folder`` whose names match ``pattern``, then the folder if it is empty (never
    through a symlink)."""
    if not _is_plain_dir(folder):
        return
    for child in folder.iterdir():
        if _is_plain_file(child) and pattern.fullmatch(child.name):
            child.unlink()
    _rmdir_if_empty(folder)


def clear_checkpoints(out: Path) -> None:
    """Remove the checkpoints inflora wrote into ``out/checkpoints`` (a fresh run must never be resumed from an
    older run's checkpoint); other files stay, and so does the folder when it still holds any."""
    root = checkpoints_dir(out)
    if not _is_plain_dir(root):
        return
    _remove_if_ours(root, (LATEST,))
    for child in root.iterdir():
        if TASK_DIR.fullmatch(child.name) or TMP_TASK_DIR.fullmatch(child.name):
            remove_checkpoint_folder(child)
    _rmdir_if_empty(root)


def _rmdir_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def clear_run(out: Path) -> None:
    """What an earlier inflora run wrote into ``out`` (``--overwrite``): its results, config, log, summary,
    checkpoints and ``seed_N`` run folders; nothing else. ``out`` itself stays."""
    check_run_folder(out)
    for folder in _run_folders(out):
        clear_checkpoints(folder)
        _remove_if_ours(folder, RUN_FILES)
        for name, pattern in ((FIGURES, FIGURE_FILE), (TENSORBOARD, EVENT_FILE)):
            _remove_matching(folder / name, pattern)
        if folder != Path(out):
            _rmdir_if_empty(folder)


def remove_empty_folders(created: list[Path]) -> None:
    """Remove the folders a failed start-up created (deepest first), as long as they are empty."""
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        _rmdir_if_empty(folder)


def missing_folders(out: Path) -> list[Path]:
    """``out`` and those of its parents that do not exist yet (what creating ``out`` would create)."""
    out = Path(out).absolute()
    created = []
    while not out.exists() and not out.is_symlink() and out != out.parent:
        created.append(out)
        out = out.parent
    return created


def saved_config(out: Path) -> dict[str, Any] | None:
    """The resolved config an earlier run wrote into ``out/config.yaml``, or None when there is none."""
    path = Path(out) / CONFIG_FILE
    if not _is_plain_file(path):
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}): restore it, or start a new run in another --out") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a resolved config: restore it, or start a new run in another --out")
    return data

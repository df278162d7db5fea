"""Checkpoints after every task, resuming from the last complete one, and the fault-injection hook of the tests.

Layout inside a run folder::

    checkpoints/task_002/tensors.safetensors   the learner's state_dict() (prefix "learner."), the feature-drift
                                               references ("probe."), torch RNGs
    checkpoints/task_002/state.json            run state, resolved config, data fingerprint, Python/NumPy RNGs,
                                               checksums of the tensors and of state.json itself
    checkpoints/latest                         "task_002": the last complete checkpoint

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then does ``latest`` move
(atomically) to it; older checkpoints are pruned to the last :data:`KEEP`. A kill at any moment therefore leaves the
checkpoint ``latest`` names complete. Tensors are safetensors and everything else JSON: loading never unpickles.
Both files are verified on loading (SHA-256). When ``latest`` is missing, the newest ``task_NNN`` that verifies is
used. Only checkpoints inflora wrote are ever deleted (:mod:`inflora.runfolder`).

There is no optimiser state: the engine builds a fresh optimiser at the start of every task and checkpoints are
taken between tasks, so no optimiser outlives its task. Every random draw of a task is seeded from ``(seed, task)``,
so a resumed run repeats exactly what an uninterrupted one does (the RNG states are saved and restored too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .config import SECTIONS, ConfigError, RunConfig, to_dict
from .distributed import broadcast_bytes, on_main
from .faults import fault
from .results import RunState, atomic_write_text
from .runfolder import LATEST, STATE_FILE, TASK_DIR, TENSOR_FILE, checkpoints_dir, remove_checkpoint_folder
from .runfolder import clear_checkpoints as clear_checkpoints

log = logging.getLogger("inflora")

FORMAT = 3
"""Format 3 adds the checksum of state.json and the data fingerprint; format 2 checkpoints are still read."""
READABLE = (2, 3)
KEEP = 2
"""Complete checkpoints kept (the newest and the one before, in case the newest is damaged later)."""
COSMETIC_KEYS = frozenset({"description", "data.data_dir", "train.progress", "train.num_workers", "train.device",
                           "logging.tensorboard"})
"""Config keys that do not change results: a run may be resumed with other values."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, of another format, or not writable."""


# ------------------------------------------------------------------------------------------------ writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _rng_state(cuda: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, NumPy and torch RNG states; the CUDA generators' too when the run uses CUDA (``cuda``)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)
    meta = {"python": [version, list(keys), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return meta, tensors


def _set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, keys, gauss = meta["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda")), key=lambda k: int(k[8:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def state_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its own ``state_sha256`` field."""
    body = {k: v for k, v in meta.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_checkpoint(out: Path, state: RunState, learner_state: dict[str, torch.Tensor], config: RunConfig,
                    num_tasks: int, cuda: bool = False, keep: int = KEEP, data: dict[str, Any] | None = None,
                    probe_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint after the last finished task of ``state`` into ``out/checkpoints``: the learner's whole
    ``state_dict()``, the run state, the feature-drift references ``probe_state``, the resolved config, the data
    fingerprint ``data`` and the RNG states (the CUDA ones when ``cuda``); point ``latest`` at it; prune to the last
    ``keep``. Returns the checkpoint folder."""
    done = state.tasks_done
    root = checkpoints_dir(Path(out))
    name = f"task_{done:03d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    rng_meta, rng_tensors = _rng_state(cuda)
    tensors = {f"learner.{k}": v.detach().cpu().contiguous() for k, v in learner_state.items()}
    tensors.update({f"probe.{k}": v.detach().cpu().contiguous() for k, v in (probe_state or {}).items()})
    tensor_bytes = save_tensors({**tensors, **rng_tensors})
    meta = {
        "format": FORMAT,
        "tasks_done": done,
        "num_tasks": num_tasks,
        "method": config.method,
        "run_state": dataclasses.asdict(state),
        "config": to_dict(config),
        "rng": rng_meta,
        "data": data,
        "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest(),
    }
    meta["state_sha256"] = state_checksum(json.loads(json.dumps(meta)))
    try:
        root.mkdir(parents=True, exist_ok=True)
        if (tmp.exists() or tmp.is_symlink()) and not remove_checkpoint_folder(tmp):
            raise OSError(f"{tmp} holds files inflora did not write")
        tmp.mkdir()
        _write_bytes(tmp / TENSOR_FILE, tensor_bytes)
        fault("checkpoint", task=done - 1, stage="tensors")
        _write_bytes(tmp / STATE_FILE, (json.dumps(meta, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        # a folder left by a run killed before `latest` moved to it is not referenced: replace it
        if (final.exists() or final.is_symlink()) and not remove_checkpoint_folder(final):
            raise OSError(f"{final} holds files inflora did not write")
        os.replace(tmp, final)
        _fsync_dir(root)
        fault("checkpoint", task=done - 1, stage="folder")
        atomic_write_text(root / LATEST, name + "\n")
        _fsync_dir(root)
    except OSError as exc:
        remove_checkpoint_folder(tmp)
        previous = _read_latest_name(root)
        kept = f"; the last complete checkpoint ({previous}) is kept" if previous else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {exc.strerror or exc}{kept}") from exc
    _prune(root, done, keep)
    log.info("checkpoint after task %d: %s", done, final)
    return final


def _prune(root: Path, done: int, keep: int) -> None:
    for path in root.iterdir():
        stale = re.fullmatch(r"\.tmp-task_\d+-\d+", path.name) is not None
        stale |= TASK_DIR.fullmatch(path.name) is not None and int(path.name[5:]) <= done - keep
        if stale:
            remove_checkpoint_folder(path)


def check_free_space(out: Path, checkpoint_bytes: int, keep: int = KEEP) -> None:
    """Refuse to start when ``out`` cannot hold ``keep`` checkpoints of ``checkpoint_bytes`` (an upper estimate of
    one, e.g. the learner's ``estimate_state_bytes()``) plus the one being written."""
    need = (keep + 1) * (int(checkpoint_bytes) + 64 * 1024)
    free = shutil.disk_usage(out).free
    if free < need:
        raise ConfigError(f"output folder {out} has {free / 2**20:.1f} MiB free, but the checkpoints of this run need "
                          f"about {need / 2**20:.1f} MiB: free some space or choose another --out")


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class Checkpoint:
    """A checkpoint read back: where it lives, its JSON part and its tensors."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def tasks_done(self) -> int:
        return int(self.meta["tasks_done"])

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1 :]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def _read_latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _task_folders(root: Path) -> list[Path]:
    """The ``task_NNN`` checkpoint folders in ``root`` (not symlinks), newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if TASK_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def how_to_continue(folder: Path) -> str:
    """What to do when the checkpoint in ``folder`` cannot be used: resume from the one before, if any is kept."""
    root = folder.parent
    number = int(folder.name[5:]) if TASK_DIR.fullmatch(folder.name) else 0
    older = [p.name for p in _task_folders(root) if int(p.name[5:]) < number]
    if older:
        return (f"to continue from the previous checkpoint, write its name ({older[0]}) into {root / LATEST} and run "
                "the same command again with --resume")
    return "no earlier checkpoint is kept: start the run again with --overwrite"


def _read_folder(folder: Path) -> tuple[bytes, bytes]:
    files = []
    for file in (folder / STATE_FILE, folder / TENSOR_FILE):
        try:
            files.append(file.read_bytes())
        except OSError as exc:
            raise CheckpointError(f"checkpoint file {file} cannot be read ({exc.strerror or exc}): the checkpoint is "
                                  f"incomplete or was removed; {how_to_continue(folder)}") from exc
    return files[0], files[1]


def _recover(root: Path) -> tuple[Path, bytes, bytes] | None:
    """``latest`` is missing: the newest ``task_NNN`` that reads and verifies (None: there is no task folder)."""
    folders = _task_folders(root)
    failures = []
    for folder in folders:
        try:
            state_bytes, tensor_bytes = _read_folder(folder)
            _parse(folder, state_bytes, tensor_bytes)
        except CheckpointError as exc:
            failures.append(f"{folder.name}: {str(exc).split(';')[0]}")
            continue
        log.warning("%s is missing: recovered the newest complete checkpoint, %s", root / LATEST, folder.name)
        return folder, state_bytes, tensor_bytes
    if folders:
        raise CheckpointError(f"no complete checkpoint in {root}: {LATEST} is missing and no task folder verifies "
                              f"({'; '.join(failures)}); start the run again with --overwrite (which deletes them)")
    return None


def _read_files(out: Path) -> tuple[Path, bytes, bytes] | None:
    """Locate the last complete checkpoint and read its two files (raises CheckpointError; None: no checkpoint).
    Without ``latest``, the newest task folder that verifies."""
    root = checkpoints_dir(Path(out))
    latest = root / LATEST
    if not latest.exists():
        return _recover(root)
    name = _read_latest_name(root)
    if name is None or not TASK_DIR.fullmatch(name):
        raise CheckpointError(f"{latest} is corrupt: expected a checkpoint name such as task_002, got {name!r}; "
                              f"write the name of a checkpoint folder in {root} into it, or delete it to resume from "
                              "the newest complete one")
    folder = root / name
    return (folder, *_read_folder(folder))


def _parse(folder: Path, state_bytes: bytes, tensor_bytes: bytes) -> Checkpoint:
    state_file, tensor_file = folder / STATE_FILE, folder / TENSOR_FILE
    try:
        meta = json.loads(state_bytes.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {state_file} is corrupt or truncated ({exc}); "
                              f"{how_to_continue(folder)}") from exc
    if meta.get("format") not in READABLE:
        raise CheckpointError(f"checkpoint file {state_file} has format {meta.get('format')!r}; this version of "
                              f"inflora reads formats {', '.join(map(str, READABLE))}")
    required = ["tasks_done", "config", "run_state", "rng", "tensors_sha256"]
    if meta["format"] >= 3:
        required.append("state_sha256")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint file {state_file} is corrupt: missing {', '.join(missing)}; "
                              f"{how_to_continue(folder)}")
    if "state_sha256" in meta and state_checksum(meta) != meta["state_sha256"]:
        raise CheckpointError(f"checkpoint file {state_file} is corrupt or was edited (checksum mismatch); "
                              f"{how_to_continue(folder)}")
    if hashlib.sha256(tensor_bytes).hexdigest() != meta["tensors_sha256"]:
        raise CheckpointError(f"checkpoint file {tensor_file} is corrupt or truncated (checksum mismatch); "
                              f"{how_to_continue(folder)}")
    try:
        tensors = load_tensors(tensor_bytes)
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"checkpoint file {tensor_file} is corrupt or truncated ({exc}); "
                              f"{how_to_continue(folder)}") from exc
    return Checkpoint(folder, meta, tensors)


def load_latest(out: Path) -> Checkpoint | None:
    """The last complete checkpoint of the run in ``out`` (without ``latest``: the newest that verifies), or None
    when it has none yet. Under torchrun, rank 0 reads the files and sends their bytes to the other ranks (no shared
    file system needed)."""
    found = on_main(lambda: _read_files(out))
    folder_text = broadcast_bytes(str(found[0]).encode() if found else None).decode()
    if not folder_text:
        return None
    state_bytes = broadcast_bytes(found[1] if found else None)
    tensor_bytes = broadcast_bytes(found[2] if found else None)
    return _parse(Path(folder_text), state_bytes, tensor_bytes)


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """Top-level sections (``train``, ``inflora``, ...) as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def config_differences(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """Keys (dotted) whose values differ between a saved config and ``config``, cosmetic keys excepted. A key the
    saved config lacks although it has the key's section (or the section is one of the run config's own, such as
    ``evaluation``) was added by a later version: it counts as its default value."""
    mine = _flatten(json.loads(json.dumps(to_dict(config))))
    theirs = _flatten(saved)
    defaults = _flatten(json.loads(json.dumps(to_dict(RunConfig(method=config.method,
                                                                 classifier=config.classifier)))))
    sections = {k.split(".")[0] for k in theirs}
    for key, value in defaults.items():
        section = key.split(".")[0]
        if key not in theirs and (section in sections or section not in SECTIONS):
            theirs[key] = value
    keys = sorted((set(mine) | set(theirs)) - COSMETIC_KEYS)
    return [k for k in keys if mine.get(k) != theirs.get(k)]


def describe_differences(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """``"key: saved X, now Y"`` for every key :func:`config_differences` finds."""
    theirs = _flatten(saved)
    mine = _flatten(json.loads(json.dumps(to_dict(config))))
    return [f"{k}: saved {theirs.get(k)!r}, now {mine.get(k)!r}" for k in config_differences(saved, config)]


def check_saved_config(saved: dict[str, Any], where: Path, config: RunConfig) -> None:
    """Refuse to resume the run ``where`` (saved config ``saved``) with a configuration that changes results."""
    differ = describe_differences(saved, config)
    if differ:
        details = "; ".join(differ)
        raise ConfigError(f"cannot resume {where} with a different configuration ({details}); resume with the "
                          "original settings or start a new run in another --out")


def check_config(checkpoint: Checkpoint, config: RunConfig) -> None:
    """Refuse to resume ``checkpoint`` with a configuration that would change the results."""
    check_saved_config(checkpoint.meta["config"], checkpoint.path, config)


def restore_rng(checkpoint: Checkpoint) -> None:
    """Set the Python, NumPy and torch RNG states saved in ``checkpoint``."""
    _set_rng_state(checkpoint.meta["rng"], {k: v for k, v in checkpoint.tensors.items() if k.startswith("rng.")})

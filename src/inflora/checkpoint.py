"""Checkpoints after every task, resuming from the last complete one, and the fault-injection hook of the tests.

Layout inside a run folder::

    checkpoints/task_002/tensors.safetensors   the learner's state_dict() (prefix "learner."), torch RNGs
    checkpoints/task_002/state.json            run state, resolved config, Python/NumPy RNGs, checksum of the tensors
    checkpoints/latest                         "task_002": the last complete checkpoint

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then does ``latest`` move
(atomically) to it; older checkpoints are pruned to the last :data:`KEEP`. A kill at any moment therefore leaves the
checkpoint ``latest`` names complete. Tensors are safetensors and everything else JSON: loading never unpickles.

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

from . import distributed
from .config import ConfigError, RunConfig, to_dict
from .faults import fault
from .results import RunState, atomic_write_text

log = logging.getLogger("inflora")

FORMAT = 2
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
KEEP = 2
"""Complete checkpoints kept (the newest and the one before, in case the newest is damaged later)."""
COSMETIC_KEYS = frozenset({"description", "data.data_dir", "train.progress", "train.num_workers", "train.device"})
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


def save_checkpoint(out: Path, state: RunState, learner_state: dict[str, torch.Tensor], config: RunConfig,
                    num_tasks: int, cuda: bool = False, keep: int = KEEP) -> Path:
    """Write the checkpoint after the last finished task of ``state`` into ``out/checkpoints``: the learner's whole
    ``state_dict()``, the run state, the resolved config and the RNG states (the CUDA ones when ``cuda``); point
    ``latest`` at it; prune to the last ``keep``. Returns the checkpoint folder."""
    done = state.tasks_done
    root = Path(out) / CHECKPOINTS
    name = f"task_{done:03d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    rng_meta, rng_tensors = _rng_state(cuda)
    tensors = {f"learner.{k}": v.detach().cpu().contiguous() for k, v in learner_state.items()}
    tensor_bytes = save_tensors({**tensors, **rng_tensors})
    meta = {
        "format": FORMAT,
        "tasks_done": done,
        "num_tasks": num_tasks,
        "method": config.method,
        "run_state": dataclasses.asdict(state),
        "config": to_dict(config),
        "rng": rng_meta,
        "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest(),
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_bytes(tmp / TENSOR_FILE, tensor_bytes)
        fault("checkpoint", task=done - 1, stage="tensors")
        _write_bytes(tmp / STATE_FILE, (json.dumps(meta, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        if final.exists():  # left by a run killed before `latest` moved to it: not referenced
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        fault("checkpoint", task=done - 1, stage="folder")
        atomic_write_text(root / LATEST, name + "\n")
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = _read_latest_name(root)
        kept = f"; the last complete checkpoint ({previous}) is kept" if previous else ""
        raise CheckpointError(f"cannot write checkpoint {final}: {exc.strerror or exc}{kept}") from exc
    _prune(root, done, keep)
    log.info("checkpoint after task %d: %s", done, final)
    return final


def _prune(root: Path, done: int, keep: int) -> None:
    for path in root.iterdir():
        match = re.fullmatch(r"task_(\d+)", path.name)
        stale = path.name.startswith(".tmp-") or (match is not None and int(match.group(1)) <= done - keep)
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def clear_checkpoints(out: Path) -> None:
    """Remove ``out/checkpoints`` (a fresh run must never be resumed from an older run's checkpoint)."""
    shutil.rmtree(Path(out) / CHECKPOINTS, ignore_errors=True)


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


def _read_files(out: Path) -> tuple[Path, bytes, bytes] | None:
    """Locate the last complete checkpoint and read its two files (raises CheckpointError; None: no checkpoint)."""
    root = Path(out) / CHECKPOINTS
    latest = root / LATEST
    if not latest.exists():
        return None
    name = _read_latest_name(root)
    if name is None or not re.fullmatch(r"task_\d+", name):
        raise CheckpointError(f"{latest} is corrupt: expected a checkpoint name such as task_002, got {name!r}")
    folder = root / name
    files = []
    for file in (folder / STATE_FILE, folder / TENSOR_FILE):
        try:
            files.append(file.read_bytes())
        except OSError as exc:
            raise CheckpointError(f"checkpoint file {file} cannot be read ({exc.strerror or exc}): the checkpoint is "
                                  "incomplete or was removed") from exc
    return folder, files[0], files[1]


def _parse(folder: Path, state_bytes: bytes, tensor_bytes: bytes) -> Checkpoint:
    state_file, tensor_file = folder / STATE_FILE, folder / TENSOR_FILE
    try:
        meta = json.loads(state_bytes.decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {state_file} is corrupt or truncated ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {state_file} has format {meta.get('format')!r}; this version of "
                              f"inflora reads format {FORMAT}")
    missing = [k for k in ("tasks_done", "config", "run_state", "rng", "tensors_sha256") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint file {state_file} is corrupt: missing {', '.join(missing)}")
    if hashlib.sha256(tensor_bytes).hexdigest() != meta["tensors_sha256"]:
        raise CheckpointError(f"checkpoint file {tensor_file} is corrupt or truncated (checksum mismatch)")
    try:
        tensors = load_tensors(tensor_bytes)
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"checkpoint file {tensor_file} is corrupt or truncated ({exc})") from exc
    return Checkpoint(folder, meta, tensors)


def load_latest(out: Path) -> Checkpoint | None:
    """The last complete checkpoint of the run in ``out``, or None when it has none yet. Under torchrun, rank 0
    reads the files and sends their bytes to the other ranks (no shared file system needed)."""
    found = distributed.on_main(lambda: _read_files(out))
    folder_text = distributed.broadcast_bytes(str(found[0]).encode() if found else None).decode()
    if not folder_text:
        return None
    state_bytes = distributed.broadcast_bytes(found[1] if found else None)
    tensor_bytes = distributed.broadcast_bytes(found[2] if found else None)
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
    """Keys (dotted) whose values differ between a saved config and ``config``, cosmetic keys excepted."""
    mine = _flatten(json.loads(json.dumps(to_dict(config))))
    theirs = _flatten(saved)
    keys = sorted((set(mine) | set(theirs)) - COSMETIC_KEYS)
    return [k for k in keys if mine.get(k) != theirs.get(k)]


def check_config(checkpoint: Checkpoint, config: RunConfig) -> None:
    """Refuse to resume ``checkpoint`` with a configuration that would change the results."""
    differ = config_differences(checkpoint.meta["config"], config)
    if differ:
        saved = _flatten(checkpoint.meta["config"])
        mine = _flatten(json.loads(json.dumps(to_dict(config))))
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {mine.get(k)!r}" for k in differ)
        raise ConfigError(f"cannot resume {checkpoint.path} with a different configuration ({details}); resume with "
                          "the original settings or start a new run in another --out")


def restore_rng(checkpoint: Checkpoint) -> None:
    """Set the Python, NumPy and torch RNG states saved in ``checkpoint``."""
    _set_rng_state(checkpoint.meta["rng"], {k: v for k, v in checkpoint.tensors.items() if k.startswith("rng.")})

"""Checkpoints after every task, resuming from the last complete one, and the fault-injection hook of the tests.

Layout inside a run folder::

    checkpoints/task_002/tensors.safetensors   heads, learner extra state (adapter), class statistics, torch RNGs
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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from . import distributed
from .config import ConfigError, RunConfig, to_dict
from .results import atomic_write_text

if TYPE_CHECKING:
    from .engine import Experiment

log = logging.getLogger("inflora")

FORMAT = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
KEEP = 2
"""Complete checkpoints kept (the newest and the one before, in case the newest is damaged later)."""
COSMETIC_KEYS = frozenset({"description", "data.data_dir", "train.progress", "train.num_workers", "train.device"})
"""Config keys that do not change results: a run may be resumed with other values."""

FAULT_ENV = "INFLORA_FAULT"
FAULT_EXIT_CODE = 87


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, of another format, or not writable."""


class InjectedFault(RuntimeError):
    """Raised by :func:`fault` for the ``raise`` action."""


def fault(point: str, **context: object) -> str | None:
    """Fault-injection hook for tests, read from ``$INFLORA_FAULT`` and nowhere else.

    The variable holds comma-separated specs ``<point>[:<key>=<value>...][:<action>]``, e.g. ``train:task=1:step=3``.
    A spec fires when ``point`` matches and every given key equals ``context[key]`` (compared as text; ``rank`` is
    always in the context). Actions: ``exit`` (default) ends the process at once with status 87, as a kill would (no
    clean-up, no flushing); ``raise`` raises :class:`InjectedFault`; ``nan`` is returned, and the caller makes its
    loss NaN. Points: ``train`` (task, epoch, step: before the step's update), ``stats`` (task, phase: ``design`` or
    ``memory``, batch), ``checkpoint`` (task: the task just finished; stage: ``tensors``
    after the tensor file is written, ``folder`` after the folder is renamed into place, before ``latest`` moves).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    context = {"rank": distributed.rank(), **context}
    for item in spec.split(","):
        name, *parts = item.strip().split(":")
        if name != point:
            continue
        wanted = dict(p.split("=", 1) for p in parts if "=" in p)
        actions = [p for p in parts if "=" not in p]
        if all(str(context.get(k)) == v for k, v in wanted.items()):
            action = actions[0] if actions else "exit"
            if action == "exit":
                os._exit(FAULT_EXIT_CODE)
            if action == "raise":
                raise InjectedFault(f"injected fault at {point} {context}")
            return action
    return None


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


def checkpoint_tensors(experiment: Experiment) -> dict[str, torch.Tensor]:
    """Heads, the learner's extra state and the class statistics, as CPU tensors keyed by prefix."""
    learner = experiment.learner
    tensors = {f"heads.{k}": v.detach() for k, v in learner.heads.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach() for k, v in learner.extra_state().items()})
    tensors.update({f"class_stats.{k}": v for k, v in experiment.class_stats.state_dict().items()})
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(experiment: Experiment, out: Path, keep: int = KEEP) -> Path:
    """Write the checkpoint of ``experiment`` after its last finished task into ``out/checkpoints``; point
    ``latest`` at it; prune to the last ``keep``. Returns the checkpoint folder."""
    state = experiment.state
    done = state.tasks_done
    root = Path(out) / CHECKPOINTS
    name = f"task_{done:03d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    rng_meta, rng_tensors = _rng_state(experiment.device.type == "cuda")
    tensor_bytes = save_tensors({**checkpoint_tensors(experiment), **rng_tensors})
    meta = {
        "format": FORMAT,
        "tasks_done": done,
        "num_tasks": experiment.num_tasks,
        "method": experiment.config.method,
        "head_sizes": list(experiment.learner.heads.sizes),
        "run_state": dataclasses.asdict(state),
        "config": to_dict(experiment.config),
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


def estimate_bytes(experiment: Experiment) -> int:
    """An upper estimate of one checkpoint's size at the end of the run (for the free-space check)."""
    learner = experiment.learner
    dim = learner.backbone.feature_dim
    classes = sum(len(t.classes) for t in experiment.scenario.tasks)
    total = 4 * (dim + 1) * classes + 64 * 1024
    adapter = getattr(learner, "adapter", None)
    if adapter is not None:
        rank = adapter.config.rank
        for site in adapter.sites.values():
            total += 4 * site.dim * site.dim
            total += sum(4 * rank * (layer.in_features + layer.out_features) for _, layer in site.layers) * \
                experiment.num_tasks
    if experiment.config.alignment.enabled:
        total += 8 * (dim * dim + dim + 1) * classes
    return total


def check_free_space(experiment: Experiment, out: Path, keep: int = KEEP) -> None:
    """Refuse to start when ``out`` cannot hold ``keep`` checkpoints plus the one being written."""
    need = (keep + 1) * estimate_bytes(experiment)
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
    missing = [k for k in ("tasks_done", "config", "run_state", "head_sizes", "rng", "tensors_sha256") if k not in meta]
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
    sections = {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in sections and isinstance(value, dict):
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


def restore(experiment: Experiment, checkpoint: Checkpoint) -> None:
    """Load ``checkpoint`` into a freshly built ``experiment``: heads, learner extra state, class statistics, run
    state and RNG states. ``experiment.run()`` then continues at the next task."""
    from .engine import RunState

    check_config(checkpoint, experiment.config)
    meta = checkpoint.meta
    if experiment.state.tasks_done or len(experiment.learner.heads):
        raise RuntimeError("restore needs a freshly built experiment")
    if meta["num_tasks"] != experiment.num_tasks:
        raise CheckpointError(f"{checkpoint.path} holds a run of {meta['num_tasks']} tasks; this one has "
                              f"{experiment.num_tasks}")
    learner = experiment.learner
    try:
        for size in meta["head_sizes"]:
            learner.heads.add(int(size))
        learner.heads.to(learner.device)
        learner.heads.load_state_dict(checkpoint.section("heads"))
        learner.heads.requires_grad_(False)
        learner.load_extra_state(checkpoint.section("extra"))
        experiment.class_stats.load_state_dict(checkpoint.section("class_stats"))
        experiment.state = RunState(**meta["run_state"])
        _set_rng_state(meta["rng"], {k: v for k, v in checkpoint.tensors.items() if k.startswith("rng.")})
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint.path} does not fit this run: {exc}") from exc
    log.info("resumed from %s: %d of %d tasks done", checkpoint.path, experiment.state.tasks_done,
             experiment.num_tasks)

"""The runtime of a run: device, mixed precision, the one seed function, synchronisation and the process's rank."""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError
from .distributed import is_distributed, local_rank, rank, world_size

SEED_MODULUS = 2**63


def derive_seed(seed: int, index: int = 0, purpose: int = 0) -> int:
    """The one way this package derives a seed: from the run seed, an index (a task, an epoch's sample, ...) and
    a purpose number, ``(seed * 1_000_003 + index * 10_007 + purpose * 101) mod 2**63``. Every random draw of a
    task is seeded from such a value, so any task can be replayed alone (a resumed run repeats exactly).

    Purposes used by the package: 0 task start (head initialisation, dropout), 1 statistics subsample, 2 statistics
    pass, 3 classifier alignment, 4 designed or random down-projections, 5 evaluation subsample, 6 a text cipher's
    letters (from the cipher's own seed, not the run's), 7 k-means seeding (task identification), 8 prompt
    initialisation (prompt methods: index 0 at construction, the task index for per-task components), 9 feature-drift
    probe samples, ``10 + e`` epoch ``e``'s batch order, 1000 a fixed random feature projection, 1001 the ridge
    classifier's fit/held-out split (later purposes take numbers from 1000 up, clear of the epochs); a sample's random
    transform uses ``derive_seed(epoch seed, sample index)``.
    """
    return (int(seed) * 1_000_003 + int(index) * 10_007 + int(purpose) * 101) % SEED_MODULUS


def parse_seeds(text: str | None) -> list[int] | None:
    """Seeds from ``--seeds 0,1,2`` (None when not given): distinct integers in ``[0, 2**63)``."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct integers, got {text!r}")
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise ConfigError(f"--seeds must be integers in [0, 2**63), got {', '.join(map(str, bad))}")
    return seeds


class Purpose:
    """Named purpose numbers of :func:`derive_seed`."""

    TASK = 0
    SUBSAMPLE = 1
    STATS = 2
    ALIGN = 3
    DESIGN = 4
    EVAL_SUBSAMPLE = 5
    CIPHER = 6
    KMEANS = 7
    PROMPTS = 8
    PROBE = 9
    PROJECTION = 1000
    RIDGE_SPLIT = 1001
    EPOCH = 10


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device; under torchrun, ``auto``/``cuda`` mean the local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"train.device={name!r} is not a device (auto, cpu, cuda, cuda:N): {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    if device.type == "cuda" and is_distributed():
        if device.index is not None:
            raise ValueError(f"train.device={name!r} names one GPU; under torchrun use auto or cuda (each rank "
                             "takes the GPU of its LOCAL_RANK)")
        rank, count = local_rank(), torch.cuda.device_count()
        if rank >= count:
            raise ValueError(f"train.device={name!r}: this process has LOCAL_RANK {rank} but only {count} GPU(s) are "
                             "visible; start at most one process per GPU (torchrun --nproc_per_node) or use "
                             "train.device=cpu")
        device = torch.device("cuda", rank)
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic units (AVX512-BF16 or AMX); without them bfloat16 is emulated and
    slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_enabled(amp: bool | str, device: torch.device) -> bool:
    """Whether ``train.amp`` = ``amp`` turns bfloat16 autocast on for ``device``: ``True`` on CUDA only,
    ``"always"`` on every device, ``False`` nowhere."""
    if amp is True or amp is False:
        return amp and device.type == "cuda"
    if amp == "always":
        return True
    raise ValueError(f"amp must be true, false or 'always', got {amp!r}")


def precision_name(autocast: bool) -> str:
    """How a run's forward passes compute, as ``results.json`` records it: ``"bfloat16 autocast"`` or ``"float32"``."""
    return "bfloat16 autocast" if autocast else "float32"


@dataclass
class Runtime:
    """Where and how a run computes: its device, bfloat16 autocast (``train.amp``), rank and world size."""

    device: torch.device
    amp: bool = False
    rank: int = 0
    world_size: int = 1

    @classmethod
    def create(cls, device: str = "auto", amp: bool | str = True) -> Runtime:
        """The runtime of ``train.device`` / ``train.amp`` (see :func:`autocast_enabled`). Autocast on a CPU without
        bfloat16 units warns once: it runs, but slower than float32."""
        resolved = resolve_device(device)
        enabled = autocast_enabled(amp, resolved)
        if enabled and resolved.type == "cpu" and not cpu_has_bf16():
            warnings.warn("train.amp=always on a CPU without bfloat16 units (AVX512-BF16 or AMX): bfloat16 is "
                          "emulated here and slower than float32; use train.amp=true (float32 on the CPU)",
                          stacklevel=2)
        return cls(resolved, amp=enabled, rank=rank(), world_size=world_size())

    @property
    def precision(self) -> str:
        """What the forward passes compute in (:func:`precision_name`)."""
        return precision_name(self.amp)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """bfloat16 autocast when ``amp``, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def sync(self) -> None:
        """Wait for the device's queued work (so wall-clock timings are true on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def timer(self, into: dict[str, float], key: str) -> Iterator[None]:
        """Add the synchronised wall time of the block to ``into[key]``."""
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            into[key] = into.get(key, 0.0) + time.perf_counter() - start

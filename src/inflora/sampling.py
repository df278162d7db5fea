"""Batch samplers: length-grouped shuffling for text (little padding), padding-bounded batches of a length-ordered
pass, shuffled batches, each rank's share of a
global batch (distributed training), and per-sample seeding of random transforms."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .runtime import derive_seed


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar length (as Hugging Face's ``group_by_length``).

    A seeded permutation is cut into windows of ``batch_size * window`` samples; each window is sorted by length and
    cut into batches; the batches are shuffled. Every sample appears once per epoch; the order depends only on the
    seed. ``drop_last`` is never applied.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 50) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.window = int(window)

    def batches(self) -> list[list[int]]:
        rng = np.random.RandomState(self.seed % 2**32)
        perm = rng.permutation(len(self.lengths))
        span = self.batch_size * self.window
        out: list[list[int]] = []
        for start in range(0, len(perm), span):
            chunk = perm[start : start + span]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            out.extend(chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        return [out[i] for i in rng.permutation(len(out))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


class PaddingBoundedBatches(Sampler[list[int]]):
    """Consecutive batches of samples already in ascending length order (a no-gradient text pass), cut where
    padding would grow: a batch closes at ``batch_size`` samples, or, once it holds ``batch_size // 4`` samples,
    when taking the next one would make its padded size (samples x longest) exceed ``1 + slack`` times its real size
    (the sum of lengths). Every sample appears once, in order; one batch of 100 short and long samples padded to
    the longest becomes a few batches of similar lengths. The order of samples is unchanged, so per-sample results do
    not depend on the cut (up to floating-point rounding of the batched kernels)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, slack: float = 0.1) -> None:
        lengths = [int(n) for n in lengths]
        if any(b < a for a, b in pairwise(lengths)):
            raise ValueError("PaddingBoundedBatches needs lengths in ascending order")
        self.lengths = lengths
        self.batch_size = int(batch_size)
        self.slack = float(slack)

    def batches(self) -> list[list[int]]:
        out: list[list[int]] = []
        current: list[int] = []
        total = 0
        least = max(1, self.batch_size // 4)
        for i, n in enumerate(self.lengths):
            if current and (len(current) == self.batch_size or (
                    len(current) >= least and (len(current) + 1) * n > (1 + self.slack) * (total + n))):
                out.append(current)
                current, total = [], 0
            current.append(i)
            total += n
        if current:
            out.append(current)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class GlobalBatches(Protocol):
    """A batch plan: every epoch's batches, computed up front from a seed."""

    def batches(self) -> list[list[int]]: ...


class ShuffledBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` cut from a seeded permutation (the last one smaller); the order depends only on
    the seed."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size = int(size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def batches(self) -> list[list[int]]:
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return [perm[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return (self.size + self.batch_size - 1) // self.batch_size


class RankShares(Sampler[list[int]]):
    """One rank's share of every global batch of ``plan``: each global batch is cut into ``world_size`` contiguous
    shares, so N processes together see exactly the batches of one process.

    ``weights()`` gives, per step, the factor that turns the mean loss of a share into its part of the global batch's
    mean loss under DDP's gradient averaging: ``len(share) * world_size / len(batch)`` (1.0 for one process). A share
    that would be empty (a last batch with fewer samples than ranks) holds the batch's first sample with weight 0, so
    every rank takes part in every step.
    """

    def __init__(self, plan: GlobalBatches, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.plan = plan
        self.rank = int(rank)
        self.world_size = int(world_size)

    def shares(self) -> list[tuple[list[int], float]]:
        out = []
        for batch in self.plan.batches():
            base, extra = divmod(len(batch), self.world_size)
            start = self.rank * base + min(self.rank, extra)
            share = batch[start : start + base + (self.rank < extra)]
            weight = len(share) * self.world_size / len(batch)
            out.append((share, weight) if share else (batch[:1], 0.0))
        return out

    def weights(self) -> list[float]:
        return [w for _, w in self.shares()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([share for share, _ in self.shares()])

    def __len__(self) -> int:
        return len(self.plan.batches())


class SeededSamples(Dataset):
    """``dataset[i]`` computed under torch seed ``f(seed, i)``: random transforms of a sample depend only on the
    seed and the sample, not on the order, the process or the worker that loads it. The global RNG is untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, int(i)))
            return self.dataset[i]

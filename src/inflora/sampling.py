"""Batch samplers: length-grouped shuffling for text, so batches carry little padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


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

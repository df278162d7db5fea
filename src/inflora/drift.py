"""The interference meter's feature half, for every learner: how far the features of each old task's probe samples
have moved since that task was learnt, measured inside the evaluation pass that runs anyway.

A fixed seeded subset of each task's evaluation samples (``evaluation.probe_samples`` per task,
:meth:`TaskData.probe_indices`) is the task's probe. When task ``t`` has just been learnt, the evaluation pass gives
the features of its probe samples (``Learner.predict_with_features``): they are the task's reference. After every
later task ``u``, the same pass gives them again and :func:`relative_drift` compares. References are evaluation
features, never training inputs; they are part of the checkpoint (a resumed run keeps them).
"""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum
from .taskdata import TaskData


def relative_drift(now: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean relative feature drift of ``n`` probe samples (rows)::

        drift = (1/n) * sum_i ||now_i - reference_i||_2 / ||reference_i||_2

    computed in float64; a reference of norm 0 counts with denominator the smallest positive float64 (a drift of
    0 stays 0). 0 means the features did not move; 1 means they moved as far as their own length.
    """
    if now.shape != reference.shape or now.ndim != 2:
        raise ValueError(f"features {tuple(now.shape)} and references {tuple(reference.shape)} must be equal (n, d)")
    if now.shape[0] == 0:
        raise ValueError("no probe samples to compare")
    a, b = now.to(torch.float64), reference.to(torch.float64)
    norms = b.norm(dim=1).clamp(min=torch.finfo(torch.float64).tiny)
    return float(((a - b).norm(dim=1) / norms).mean())


class FeatureProbe:
    """Collects the probe samples' features during an evaluation pass and turns them into a drift row.

    :func:`inflora.evaluation.evaluate` calls :meth:`begin` before its pass, :meth:`collect` per batch and
    :meth:`end` after it; :attr:`row` is then the row of the drift matrix after task ``upto``: for each task
    ``j <= upto``, :func:`relative_drift` of its probe features now against its reference (``0.0`` for
    ``j == upto``, whose reference is taken now; ``None`` for a task without a reference). :attr:`row` is None when
    the learner gave no features (``predict_with_features`` returned None) or the probe is off.
    """

    def __init__(self, samples_per_task: int) -> None:
        if samples_per_task < 0:
            raise ValueError(f"probe samples per task must be >= 0, got {samples_per_task}")
        self.samples_per_task = int(samples_per_task)
        self.references: dict[int, torch.Tensor] = {}
        self.row: list[float | None] | None = None
        self._slots = torch.zeros(0, dtype=torch.long)
        self._sizes: list[int] = []
        self._features = torch.zeros(0, 0)
        self._filled = torch.zeros(0)

    @property
    def active(self) -> bool:
        return self.samples_per_task > 0

    def begin(self, data: TaskData, upto: int, feature_dim: int) -> None:
        """Prepare for the evaluation pass after task ``upto`` over ``data`` (features of width ``feature_dim``)."""
        self._slots, self._sizes = data.probe_slots(upto, self.samples_per_task)
        device = self._slots.device
        self._features = torch.zeros(sum(self._sizes), feature_dim, dtype=torch.float32, device=device)
        self._filled = torch.zeros(sum(self._sizes), dtype=torch.float32, device=device)
        self.row = None

    def collect(self, features: torch.Tensor | None, start: int) -> None:
        """The features of the pass's (this rank's) samples ``start, start + 1, ...`` (None: the learner gives
        none)."""
        if features is None:
            return
        slots = self._slots[start : start + len(features)]
        if features.ndim != 2 or len(slots) != len(features) or features.shape[1] != self._features.shape[1]:
            raise ValueError(f"features of shape {tuple(features.shape)} for {len(slots)} samples: expected "
                             f"({len(slots)}, {self._features.shape[1]}), the width the classifier reads")
        keep = slots >= 0
        self._features[slots[keep]] = features[keep].detach().float()
        self._filled[slots[keep]] = 1.0

    def end(self, upto: int) -> list[float | None] | None:
        """Sum the probe features over ranks, keep task ``upto``'s as its reference and compute :attr:`row`."""
        all_reduce_sum(self._features)
        all_reduce_sum(self._filled)
        filled = int(self._filled.sum())
        if filled == 0:
            self.row = None
            return None
        if filled != len(self._filled):
            raise RuntimeError(f"the learner gave features for {filled} of {len(self._filled)} probe samples: "
                               "predict_with_features must give features for every batch or for none")
        parts = torch.split(self._features.cpu(), self._sizes)
        self.references[upto] = parts[upto].clone()
        self.row = [relative_drift(parts[j], self.references[j]) if j in self.references else None
                    for j in range(upto)] + [0.0]
        return self.row

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The references, ``task{j}`` -> (n_j, d) float32 CPU tensors."""
        return {f"task{j}": ref.clone() for j, ref in sorted(self.references.items())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        references = {}
        for key, value in state.items():
            if not (key.startswith("task") and key[4:].isdigit()) or value.ndim != 2:
                raise ValueError(f"unexpected probe state entry {key!r} of shape {tuple(value.shape)}")
            references[int(key[4:])] = value.to(torch.float32).cpu().clone()
        self.references = references

    def estimate_bytes(self, num_tasks: int, feature_dim: int) -> int:
        """Upper estimate of :meth:`state_dict`'s size at the end of a run of ``num_tasks`` tasks."""
        return 4 * self.samples_per_task * feature_dim * num_tasks

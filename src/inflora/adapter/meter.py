"""The interference meter's memory half: how much of each old task's input energy lies outside the subspace memory.

After task ``t``, for every site and every task ``j <= t``, the share of task ``j``'s input energy outside the
memory ``M_t`` the next task's design stays out of::

    share_j = tr((I - P_t) C_j) / tr(C_j)

with ``P_t`` the orthogonal projector onto ``M_t`` (the basis :meth:`InfLoRAAdapter.old_space` gives, whatever the
memory's mode) and ``C_j`` task ``j``'s uncentred input second moment from the memory pass. A new branch acts only
on that part of an old task's inputs, so it is the share of the old inputs the threshold leaves unprotected.

``C_j`` is kept as a factor ``F_j`` (d x k_j) of its leading eigendirections: the fewest that hold at least
``1 - tolerance`` of ``tr(C_j)``, so ``F_j F_j^T`` differs from ``C_j`` by a PSD remainder ``R_j`` with
``tr(R_j) <= tolerance * tr(C_j)``. The share is computed as ``(tr(C_j) - ||B^T F_j||_F^2) / tr(C_j)`` with the
exact trace: it is never below the true share and exceeds it by at most ``tolerance`` (the part of ``R_j`` inside
the memory, ``0 <= tr(P_t R_j) <= tr(R_j)``). ``tolerance = 0`` keeps every direction with non-zero energy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .adapter import InfLoRAAdapter


def energy_factor(moment: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, float]:
    """``(F, tr(C))``: the factor ``F`` (d x k, float64, ``F F^T`` the part of the PSD second moment ``C`` on its
    ``k`` leading eigendirections, the fewest whose dropped energy is at most ``tolerance * tr(C)``) and the trace."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance}")
    c = moment.to(torch.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"second moment must be square, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("second moment contains NaN or inf")
    values, vectors = torch.linalg.eigh((c + c.T) / 2)
    values, vectors = values.flip(0).clamp(min=0.0), vectors.flip(1)
    trace = float(torch.trace(c))
    if trace <= 0.0:
        raise ValueError("second moment has no energy (trace <= 0): no input reached the site")
    tail = torch.cat([values.flip(0).cumsum(0).flip(0), values.new_zeros(1)])  # tail[k] = sum(values[k:])
    keep = int(torch.nonzero(tail <= tolerance * float(values.sum()))[0])
    return vectors[:, :keep] * values[:keep].sqrt(), trace


def energy_outside(factor: torch.Tensor, trace: float, basis: torch.Tensor) -> float:
    """Share of the energy ``trace`` of ``C ~ F F^T`` outside the span of the orthonormal ``basis`` (d x m):
    ``(tr(C) - ||basis^T F||_F^2) / tr(C)``, clipped to [0, 1] (rounding)."""
    if trace <= 0.0:
        raise ValueError(f"trace must be > 0, got {trace}")
    f = factor.to(device=basis.device, dtype=torch.float64)
    inside = float((basis.to(torch.float64).T @ f).pow(2).sum()) if basis.shape[1] else 0.0
    return min(1.0, max(0.0, (trace - inside) / trace))


class EnergyMeter:
    """Per site and per finished task, the factor of the task's input second moment; after each task, the share
    of every recorded task's input energy outside the adapter's current memory (see the module docstring).

    State: per site and task a float32 factor (d x k_j) and the float64 trace; at most ``4 d^2`` bytes per site and
    task (``k_j <= d``), far less for inputs whose energy sits in few directions.
    """

    def __init__(self, tolerance: float) -> None:
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"meter tolerance must lie in [0, 1), got {tolerance}")
        self.tolerance = float(tolerance)
        self.factors: dict[str, dict[int, torch.Tensor]] = {}
        self.traces: dict[str, dict[int, float]] = {}

    def record(self, task: int, stats: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Keep the factor of each site's second moment ``stats[site]`` of ``task``. Returns ``{site: k}``."""
        kept = {}
        for name, moment in stats.items():
            factor, trace = energy_factor(moment, self.tolerance)
            self.factors.setdefault(name, {})[task] = factor.to(torch.float32).cpu()
            self.traces.setdefault(name, {})[task] = trace
            kept[name] = int(factor.shape[1])
        return kept

    def shares(self, adapter: InfLoRAAdapter, upto: int) -> dict[str, list[float | None]]:
        """``{site: [share_j for j <= upto]}`` against the adapter's memory now (None: task ``j`` not recorded,
        e.g. a run resumed from a checkpoint written before the meter existed)."""
        out: dict[str, list[float | None]] = {}
        for name in adapter.sites:
            basis = adapter.old_space(name)
            factors, traces = self.factors.get(name, {}), self.traces.get(name, {})
            out[name] = [energy_outside(factors[j], traces[j], basis) if j in factors else None
                         for j in range(upto + 1)]
        return out

    def report(self, adapter: InfLoRAAdapter, upto: int) -> dict[str, Any]:
        """Diagnostics after task ``upto``: ``energy_outside`` per site, and per task its mean and max over sites
        (``per_old_task``, which the run's report prints as matrices)."""
        per_site = self.shares(adapter, upto)
        mean: list[float | None] = []
        high: list[float | None] = []
        for j in range(upto + 1):
            values = [v[j] for v in per_site.values() if v[j] is not None]
            mean.append(sum(values) / len(values) if values else None)
            high.append(max(values) if values else None)
        return {"energy_outside": per_site,
                "per_old_task": {"energy_outside_mean": mean, "energy_outside_max": high}}

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self, sites: list[str]) -> dict[str, torch.Tensor]:
        """``site{i}.factor{j}`` (float32) and ``site{i}.trace{j}`` (float64 scalar), ``i`` in ``sites`` order."""
        state = {}
        for i, name in enumerate(sites):
            for j, factor in self.factors.get(name, {}).items():
                state[f"site{i}.factor{j}"] = factor.clone()
                state[f"site{i}.trace{j}"] = torch.tensor(self.traces[name][j], dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor], sites: list[str], dims: list[int]) -> None:
        """Restore :meth:`state_dict` for the same ``sites`` (input widths ``dims``)."""
        self.factors, self.traces = {}, {}
        for key, value in state.items():
            site, _, item = key.partition(".")
            if not (site.startswith("site") and site[4:].isdigit() and item.startswith(("factor", "trace"))):
                raise ValueError(f"unexpected meter state entry {key!r}")
            i = int(site[4:])
            if i >= len(sites):
                raise ValueError(f"meter state names site {i}, but the adapter has {len(sites)} sites")
            if item.startswith("trace"):
                continue
            j = int(item[len("factor"):])
            if value.ndim != 2 or value.shape[0] != dims[i]:
                raise ValueError(f"meter factor {key!r} has shape {tuple(value.shape)}, expected ({dims[i]}, k)")
            trace_key = f"site{i}.trace{j}"
            if trace_key not in state:
                raise ValueError(f"meter state has {key!r} but no {trace_key!r}")
            self.factors.setdefault(sites[i], {})[j] = value.to(torch.float32).cpu().clone()
            self.traces.setdefault(sites[i], {})[j] = float(state[trace_key])

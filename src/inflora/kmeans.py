"""k-means in torch (float64, on the data's device): k-means++ seeding, Lloyd iterations, seeded restarts.

Used by CoLoR's task identification (one set of centroids per task); scikit-learn is not a dependency. Distances
are squared Euclidean; the objective (inertia) is the sum of each point's squared distance to its nearest centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KMeansResult:
    """Centres ``(k, d)`` (float64), each point's cluster, the objective, the Lloyd iterations run and the
    objective after each assignment step of the kept restart (``history``: non-increasing)."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int
    history: list[float] = field(default_factory=list)


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` squared Euclidean distances of the rows of ``x`` to the rows of ``centres`` (clamped at 0)."""
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return d2.clamp_(min=0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): the first centre uniformly at random, each next one with
    probability proportional to a point's squared distance to its nearest centre so far. Draws use ``generator``
    (a CPU generator), so the seeding does not depend on the device."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = squared_distances(x, x[first : first + 1])[:, 0]
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            idx = int(torch.multinomial((d2 / total).cpu(), 1, generator=generator))
        else:  # every point coincides with a centre already: any point will do
            idx = int(torch.randint(n, (1,), generator=generator))
        chosen.append(idx)
        d2 = torch.minimum(d2, squared_distances(x, x[idx : idx + 1])[:, 0])
    return x[chosen].clone()


def lloyd(x: torch.Tensor, centres: torch.Tensor, iterations: int) -> KMeansResult:
    """Lloyd's iterations from ``centres``: assign each point to its nearest centre, move each centre to the mean
    of its points, until the assignment no longer changes (or ``iterations``). A centre left without points moves
    to the point farthest from its own centre (so no cluster stays empty)."""
    centres = centres.clone()
    labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    history: list[float] = []
    for _ in range(iterations):
        d2 = squared_distances(x, centres)
        best, new_labels = d2.min(1)
        history.append(float(best.sum()))
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=len(centres))
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        for empty in (~filled).nonzero().flatten().tolist():
            far = int(best.argmax())
            centres[empty] = x[far]
            best[far] = 0.0
    d2 = squared_distances(x, centres)
    best, labels = d2.min(1)
    return KMeansResult(centres, labels, float(best.sum()), len(history), history)


def kmeans(x: torch.Tensor, k: int, *, generator: torch.Generator, iterations: int = 100,
           restarts: int = 1) -> KMeansResult:
    """k-means of the rows of ``x`` (computed in float64 on ``x``'s device): ``restarts`` k-means++ seedings from
    ``generator`` followed by Lloyd's iterations; the lowest objective is kept."""
    if x.ndim != 2:
        raise ValueError(f"k-means needs a (n, d) matrix, got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means with k={k} clusters needs at least k points, got {x.shape[0]}")
    if iterations < 1 or restarts < 1:
        raise ValueError(f"iterations and restarts must be >= 1, got {iterations} and {restarts}")
    x = x.double()
    best: KMeansResult | None = None
    for _ in range(restarts):
        result = lloyd(x, kmeans_plus_plus(x, k, generator), iterations)
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None
    return best

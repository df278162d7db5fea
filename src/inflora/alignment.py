"""Classifier alignment ("+CA", after SLCA): per-class feature Gaussians and head re-alignment.

No input is kept: only each class's feature sum, outer-product sum and count (so statistics of one class can grow
over several domains). Heads are re-trained on samples drawn from ``N(mean, cov + shrink * I)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class ClassStatistics:
    """Running first and second moments of the features of each global class (float64)."""

    def __init__(self, feature_dim: int, device: torch.device) -> None:
        self.dim = feature_dim
        self.device = device
        self.sums: dict[int, torch.Tensor] = {}
        self.outer: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self._factors: dict[tuple[int, int, float], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate a batch of features with their global labels."""
        f = features.detach().to(self.device, torch.float64)
        for c in labels.unique().tolist():
            rows = f[labels.to(self.device) == c]
            if c not in self.sums:
                self.sums[c] = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
                self.outer[c] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
                self.counts[c] = 0
            self.sums[c] += rows.sum(0)
            self.outer[c] += rows.T @ rows
            self.counts[c] += rows.shape[0]

    def gaussian(self, c: int, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) covariance ``+ shrink * I`` of class ``c``."""
        n = self.counts[c]
        mean = self.sums[c] / n
        cov = (self.outer[c] - n * torch.outer(mean, mean)) / max(n - 1, 1)
        cov = (cov + cov.T) / 2 + shrink * torch.eye(self.dim, dtype=torch.float64, device=self.device)
        return mean, cov

    def sampler(self, c: int, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and Cholesky factor of class ``c``'s Gaussian in float32, cached until the class gets more data."""
        key = (c, self.counts[c], shrink)
        if key not in self._factors:
            self._factors = {k: v for k, v in self._factors.items() if k[0] != c}
            mean, cov = self.gaussian(c, shrink)
            self._factors[key] = (mean.float(), torch.linalg.cholesky(cov).float())
        return self._factors[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for c in sorted(self.sums):
            state[f"class{c}.sum"] = self.sums[c].cpu()
            state[f"class{c}.outer"] = self.outer[c].cpu()
            state[f"class{c}.count"] = torch.tensor(self.counts[c])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        classes = sorted({int(k.split(".")[0][5:]) for k in state})
        for c in classes:
            self.sums[c] = state[f"class{c}.sum"].to(self.device, torch.float64)
            self.outer[c] = state[f"class{c}.outer"].to(self.device, torch.float64)
            self.counts[c] = int(state[f"class{c}.count"])


def _reference_cosine(epoch: int, epochs: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def align_heads(heads: Any, stats: ClassStatistics, classes: list[int], upto: int, config: Any,
                generator: torch.Generator) -> float:
    """Re-train heads ``0..upto`` on Gaussian samples of ``classes`` (global labels). Returns the last loss.

    The heads are trained as one stacked linear layer (the same SGD, element for element, as training them one by
    one, with one matrix product per step) and written back.
    """
    device = heads.heads[0].weight.device
    sizes = heads.sizes[: upto + 1]
    with torch.no_grad():
        weight = torch.cat([heads.heads[t].weight for t in range(upto + 1)]).clone().requires_grad_(True)
        bias = torch.cat([heads.heads[t].bias for t in range(upto + 1)]).clone().requires_grad_(True)
    optimiser = torch.optim.SGD([weight, bias], lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    samplers = {c: stats.sampler(c, config.shrink) for c in classes}
    last = float("nan")
    for epoch in range(config.epochs):
        for group in optimiser.param_groups:
            group["lr"] = config.lr * _reference_cosine(epoch, config.epochs)
        feats, labels = [], []
        for c, (mean, chol) in samplers.items():
            z = torch.randn(config.samples_per_class, stats.dim, generator=generator)
            feats.append(mean + z.to(device) @ chol.T)
            labels.append(torch.full((config.samples_per_class,), c, dtype=torch.long))
        x = torch.cat(feats)
        y = torch.cat(labels).to(device)
        order = torch.randperm(len(y), generator=generator).to(device)
        for i in range(0, len(y), config.batch_size):
            idx = order[i : i + config.batch_size]
            logits = nn.functional.linear(x[idx], weight, bias)
            if config.logit_norm is not None:
                norms = torch.stack([chunk.norm(dim=-1) for chunk in torch.split(logits, sizes, dim=-1)]).mean(0)
                logits = logits / (norms[:, None] + 1e-7) / config.logit_norm
            loss = nn.functional.cross_entropy(logits, y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            last = float(loss.detach())
    with torch.no_grad():
        for t, (w, b) in enumerate(zip(torch.split(weight, sizes), torch.split(bias, sizes), strict=True)):
            heads.heads[t].weight.copy_(w)
            heads.heads[t].bias.copy_(b)
    for p in heads.parameters():  # heads are frozen outside their own training
        p.requires_grad_(False)
    return last

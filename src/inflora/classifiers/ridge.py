"""``ridge``: RanPAC's head, a ridge regression on a fixed random ReLU projection of the features.

``h = ReLU(f W)`` with ``W`` ``(d, M)`` i.i.d. ``N(0, 1)``, drawn once (seeded) and never trained (``M = 0``: ``h =
f``). After each task, in float64 on the model's device: ``G += H^T H`` and ``Q += H^T Y`` (``Y`` one-hot over all
classes of the run), ``lambda`` chosen for the task (below), and ``W_o = (G + lambda I)^-1 Q`` by a Cholesky solve
(an LU solve if ``G + lambda I`` is not numerically positive definite). Test-time logits are ``h W_o`` over the seen
classes. The solved head depends only on the sums ``G`` and ``Q``, so tasks accumulate exactly (one solve on all
the data gives the same head).

Lambda, as RanPAC (``optimise_ridge_parameter``): the current task's features in a seeded random order (RanPAC's
loader shuffles), a ridge fit on the first ``fit_fraction`` (80%) of them alone (not the accumulated ``G``) for every
candidate (``10^-8 .. 10^8``), the candidate with the lowest squared error on the rest is kept (the first on ties).
The fits share one eigendecomposition of the fit part's ``H^T H``.

Memory: ``G`` is ``M^2`` float64 (32 MB at ``M = 2000``, 800 MB at RanPAC's ``M = 10000``), plus ``W`` ``(d, M)``,
``Q`` and ``W_o`` ``(M, classes)``; the current task's ``N x M`` projected features exist while it ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import opt
from ..distributed import all_reduce_sum
from ..runtime import Purpose, derive_seed
from .base import Classifier, ClassLayout, register_classifier
from .taskhead import CosineHead, HeadOptions, head_loss, head_span


@dataclass
class RidgeOptions(HeadOptions):
    """Options of the random-projection ridge head."""

    projection_dim: int = opt(2000, "M: width of the fixed random ReLU projection h = ReLU(f W) (0: ridge on the "
                                    "feature itself; RanPAC uses 10000 for ViT-B)")
    lambdas: list[float] = opt(  # noqa: RUF009 (opt() gives a list default a default_factory)
        [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8],
        "ridge candidates (RanPAC's 10^-8 .. 10^8); per task the one with the lowest held-out squared error is used")
    fit_fraction: float = opt(0.8, "share of the current task's (shuffled) features the candidates are fitted on; "
                                   "the rest scores them")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.projection_dim, bool) or self.projection_dim < 0:
            raise ValueError(f"projection_dim must be an integer >= 0, got {self.projection_dim!r}")
        if not self.lambdas or not all(x > 0 and math.isfinite(x) for x in self.lambdas):
            raise ValueError(f"lambdas must be a non-empty list of finite numbers > 0, got {self.lambdas}")
        if not 0.0 < self.fit_fraction < 1.0:
            raise ValueError(f"fit_fraction must lie in (0, 1), got {self.fit_fraction}")


@register_classifier("ridge")
class RidgeClassifier(Classifier):
    """Ridge regression to one-hot targets on ``ReLU(f W)``; see the module docstring."""

    options_type = RidgeOptions
    needs_features = True
    trained_for_prediction = False

    def __init__(self, feature_dim: int, layout: ClassLayout, options: RidgeOptions | None,
                 device: torch.device) -> None:
        super().__init__(feature_dim, layout, options or RidgeOptions(), device)
        m = self.options.projection_dim or feature_dim
        self.width = m
        f64 = {"dtype": torch.float64, "device": device}
        self.register_buffer("projection", torch.zeros(0, **f64))  # (d, M) once drawn, at the first task's end
        self.register_buffer("gram", torch.zeros(m, m, **f64))
        self.register_buffer("targets", torch.zeros(m, layout.num_classes, **f64))
        self.register_buffer("weight", torch.zeros(m, layout.num_classes, **f64))
        self.register_buffer("chosen", torch.zeros(0, **f64))  # lambda of every finished task
        self._features: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.head: CosineHead | None = None
        self.head_first = 0

    # ------------------------------------------------------------------------------------------ training head
    def begin_task(self, task: int) -> None:
        first, stop = head_span(self.layout, task)
        self.head, self.head_first = CosineHead(self.feature_dim, stop - first, self.options.head_scale,
                                                self.device), first

    def parameters_for(self, task: int, all_seen: bool = False) -> list[nn.Parameter]:
        """The temporary cosine head of the task (over every seen class with ``all_seen``)."""
        first, stop = head_span(self.layout, task, all_seen)
        if self.head is None or (self.head_first, self.head_first + self.head.classes) != (first, stop):
            self.head, self.head_first = CosineHead(self.feature_dim, stop - first, self.options.head_scale,
                                                    self.device), first
        return list(self.head.parameters())

    def loss(self, features: torch.Tensor, labels: torch.Tensor, task: int, all_seen: bool = False) -> torch.Tensor:
        """Cross-entropy of the temporary cosine head (the ridge head is solved, not trained)."""
        return head_loss(self.head, self.head_first, features, labels, "ridge")

    # ------------------------------------------------------------------------------------------ the solve
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``ReLU(f W)`` in float64 (``f`` itself when ``projection_dim`` is 0)."""
        f = features.to(self.device, torch.float64)
        if not self.options.projection_dim:
            return f
        if self.projection.numel() == 0:
            raise RuntimeError("ridge: the random projection is drawn when the first task ends")
        return F.relu(f @ self.projection)

    def observe(self, features: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        """Keep a batch of the task's training features until the task ends."""
        self._features.append(features.detach().to(self.device))
        self._labels.append(labels.to(self.device))

    def end_task(self, task: int, seed: int) -> dict[str, Any]:
        """Accumulate the task's sums, choose its lambda, solve the head; drop the training head."""
        if self.options.projection_dim and self.projection.numel() == 0:
            generator = torch.Generator().manual_seed(derive_seed(seed, 0, Purpose.PROJECTION))
            self.projection = torch.randn(self.feature_dim, self.options.projection_dim, generator=generator,
                                          dtype=torch.float64).to(self.device)
        d = self.feature_dim
        features = torch.cat(self._features) if self._features else torch.zeros(0, d, device=self.device)
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long, device=self.device)
        self._features, self._labels, self.head = [], [], None
        h = self.project(features)
        y = F.one_hot(labels, self.layout.num_classes).to(torch.float64)
        self.gram += all_reduce_sum(h.T @ h)
        self.targets += all_reduce_sum(h.T @ y)
        order = torch.randperm(len(h), generator=torch.Generator().manual_seed(
            derive_seed(seed, task, Purpose.RIDGE_SPLIT))).to(self.device)
        errors = held_out_errors(h[order], y[order], self.options.lambdas, self.options.fit_fraction)
        lam = self.options.lambdas[int(torch.argmin(errors))]
        self.chosen = torch.cat([self.chosen, torch.tensor([lam], dtype=torch.float64, device=self.device)])
        self.weight, solver = ridge_solve(self.gram, self.targets, lam)
        return {"ridge_lambda": lam, "ridge_solver": solver, "ridge_samples": int(all_reduce_sum(
            torch.tensor([len(h)], device=self.device)).item()), "ridge_heldout_sse": errors.tolist()}

    def logits(self, features: torch.Tensor, upto: int) -> torch.Tensor:
        if self.chosen.numel() == 0:
            raise RuntimeError("ridge: no head is solved before the first task ends")
        return (self.project(features) @ self.weight[:, : self.layout.seen(upto)]).float()

    def export_linear(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_o^T`` when there is no random projection (``projection_dim=0``); otherwise not one linear layer."""
        if self.options.projection_dim:
            raise NotImplementedError("ridge logits ReLU(f W) W_o pass the feature through a random ReLU projection:"
                                      " not one linear layer on the feature (projection_dim=0 exports)")
        weight = self.weight[:, : self.layout.seen(upto)].T
        return weight.float().cpu().contiguous(), torch.zeros(weight.shape[0])

    # ------------------------------------------------------------------------------------------ state
    def estimate_state_bytes(self) -> int:
        m, c = self.width, self.layout.num_classes
        return 8 * (self.feature_dim * self.options.projection_dim + m * m + 2 * m * c + self.layout.num_tasks)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().cpu().clone() for k in ("projection", "gram", "targets", "weight",
                                                                       "chosen")}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("projection", "gram", "targets", "weight", "chosen"):
            if key not in state:
                raise ValueError(f"ridge classifier state has no {key!r}")
        drawn = (self.feature_dim, self.options.projection_dim) if self.options.projection_dim else (0,)
        shapes = {"gram": [tuple(self.gram.shape)], "targets": [tuple(self.targets.shape)],
                  "weight": [tuple(self.weight.shape)], "projection": [drawn, (0,)]}  # (0,): not drawn yet
        for key, allowed in shapes.items():
            if tuple(state[key].shape) not in allowed:
                raise ValueError(f"ridge state {key!r} has shape {tuple(state[key].shape)}, this run needs "
                                 f"{allowed[0]} (projection_dim, the feature width or the classes differ)")
        for key in ("projection", "gram", "targets", "weight", "chosen"):
            setattr(self, key, state[key].to(self.device, torch.float64).clone())


def held_out_errors(h: torch.Tensor, y: torch.Tensor, lambdas: list[float], fit_fraction: float) -> torch.Tensor:
    """Squared error on the rows after the first ``int(fit_fraction * N)`` of a ridge fit on those first rows, for
    every candidate in ``lambdas`` (summed over ranks). One eigendecomposition of the fit rows' ``H^T H`` serves all
    candidates: ``W(lambda) = V diag(1 / (s + lambda)) V^T H_f^T Y_f``."""
    n_fit = int(len(h) * fit_fraction)
    fit, held, y_fit, y_held = h[:n_fit], h[n_fit:], y[:n_fit], y[n_fit:]
    gram = all_reduce_sum(fit.T @ fit)
    rhs = all_reduce_sum(fit.T @ y_fit)
    values, vectors = torch.linalg.eigh(gram)
    left, right = held @ vectors, vectors.T @ rhs
    # H^T Y lies in the range of H^T H: its part along a null direction (an eigenvalue at rounding level) is
    # rounding too, and zero in exact arithmetic
    null = values <= values.abs().max() * len(values) * torch.finfo(values.dtype).eps
    values, right = values.clamp(min=0.0), right.masked_fill(null[:, None], 0.0)
    errors = torch.stack([((left / (values + lam)) @ right - y_held).square().sum() for lam in lambdas])
    return all_reduce_sum(errors)


def ridge_solve(gram: torch.Tensor, targets: torch.Tensor, lam: float) -> tuple[torch.Tensor, str]:
    """``(G + lam I)^-1 Q`` in float64 by Cholesky (LU when ``G + lam I`` is not numerically positive definite);
    returns the solution and the solver used."""
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(targets, factor), "cholesky"
    return torch.linalg.solve(system, targets), "lu"

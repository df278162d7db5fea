"""Classifier alignment ("+CA", after SLCA): per-class feature Gaussians and linear-classifier re-alignment.

Pure maths over torch: no model, head or configuration type is imported.

No input is kept: only each class's feature sum, outer-product sum and count (float64), so the statistics of a class
can grow over several tasks or domains. A stacked linear classifier (the heads of tasks ``0..t`` concatenated) is
re-trained on samples drawn from ``N(s_c * mean_c, cov_c + shrink * I)`` as in the reference
(``methods/inflora_ca.py``): ``s_c = 0.9 + 0.1 * (t_c + 1) / (t + 1)`` with ``t`` the current task and ``t_c`` the
class's task, read as the last task that added data to the class (``ClassStatistics.last_task``): in class-incremental
runs the class's only task; in domain-incremental runs, where every class gets data in every task, ``t_c = t`` and
``s_c = 1`` for the classes seen in the current task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch.nn import functional as F


class AlignOptions(Protocol):
    """What :func:`align_linear` reads (any object with these attributes: the ``aligned`` classifier's options,
    :class:`inflora.classifiers.aligned.AlignedOptions`, hold the reference's defaults)."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    samples_per_class: int
    batch_size: int
    shrink: float
    logit_norm: float | None
    mean_scale: bool


class ClassStatistics:
    """Running first and second moments (float64) of the features of each global class, and the last task that
    added data to each class (``last_task``: with tasks added in order, the largest task index seen)."""

    def __init__(self, feature_dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = int(feature_dim)
        self.device = torch.device(device)
        self.sums: dict[int, torch.Tensor] = {}
        self.outer: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.last_task: dict[int, int] = {}
        self._factors: dict[tuple[int, int, float, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def classes(self) -> list[int]:
        return sorted(self.counts)

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor, task: int) -> None:
        """Accumulate a batch of features (``(n, dim)``) with their global labels, seen in ``task`` (0-based)."""
        f = features.detach().to(self.device, torch.float64)
        labels = labels.to(self.device)
        for c in labels.unique().tolist():
            rows = f[labels == c]
            self.add_moments(int(c), rows.shape[0], rows.sum(0), rows.T @ rows, task)

    @torch.no_grad()
    def add_moments(self, c: int, count: int, total: torch.Tensor, outer: torch.Tensor, task: int) -> None:
        """Accumulate already-reduced moments of class ``c``: ``count`` rows with sum ``total`` (``(dim,)``) and
        outer-product sum ``outer`` (``(dim, dim)``), e.g. summed over distributed ranks. ``count == 0`` is a no-op."""
        count = int(count)
        if count == 0:
            return
        if c not in self.counts:
            self.sums[c] = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
            self.outer[c] = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
            self.counts[c] = 0
        self.sums[c] += total.to(self.device, torch.float64)
        self.outer[c] += outer.to(self.device, torch.float64).reshape(self.dim, self.dim)
        self.counts[c] += count
        self.last_task[c] = max(int(task), self.last_task.get(c, int(task)))

    def gaussian(self, c: int, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) covariance ``+ shrink * I`` of class ``c`` (float64)."""
        n = self.counts[c]
        mean = self.sums[c] / n
        cov = (self.outer[c] - n * torch.outer(mean, mean)) / max(n - 1, 1)
        cov = (cov + cov.T) / 2 + shrink * torch.eye(self.dim, dtype=torch.float64, device=self.device)
        return mean, cov

    def sampler(self, c: int, shrink: float, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and lower Cholesky factor of class ``c``'s Gaussian (computed in float64, returned in ``dtype``),
        cached until the class gets more data."""
        key = (c, self.counts[c], float(shrink), dtype)
        if key not in self._factors:
            self._factors = {k: v for k, v in self._factors.items() if k[0] != c or k[1] == key[1]}  # drop stale
            mean, cov = self.gaussian(c, shrink)
            self._factors[key] = (mean.to(dtype), torch.linalg.cholesky(cov).to(dtype))
        return self._factors[key]

    def stacked(self, classes: Sequence[int], shrink: float, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Means ``(K, dim)`` and Cholesky factors ``(K, dim, dim)`` of ``classes``, stacked in that order."""
        pairs = [self.sampler(c, shrink, dtype) for c in classes]
        means = torch.stack([m for m, _ in pairs])
        factors = torch.stack([f for _, f in pairs])
        if device is not None:
            means, factors = means.to(device), factors.to(device)
        return means, factors

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for c in self.classes:
            state[f"class{c}.sum"] = self.sums[c].cpu()
            state[f"class{c}.outer"] = self.outer[c].cpu()
            state[f"class{c}.count"] = torch.tensor(self.counts[c])
            state[f"class{c}.last_task"] = torch.tensor(self.last_task[c])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the statistics by ``state``. A state without ``class<c>.last_task`` (saved before tasks were
        recorded) raises ``ValueError``: the mean scaling needs each class's task and guessing it would silently
        change the alignment."""
        classes = sorted({int(k.split(".")[0][5:]) for k in state})
        missing = [c for c in classes if f"class{c}.last_task" not in state]
        if missing:
            raise ValueError(f"class statistics state has no last task for classes {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} (saved by an older version that did not record "
                             "each class's task); it cannot be resumed for alignment")
        self.sums, self.outer, self.counts, self.last_task, self._factors = {}, {}, {}, {}, {}
        for c in classes:
            self.sums[c] = state[f"class{c}.sum"].to(self.device, torch.float64)
            self.outer[c] = state[f"class{c}.outer"].to(self.device, torch.float64)
            self.counts[c] = int(state[f"class{c}.count"])
            self.last_task[c] = int(state[f"class{c}.last_task"])


def class_mean_scale(class_task: int, task: int, enabled: bool = True) -> float:
    """The reference's shrinking of older classes' means: ``0.9 + 0.1 * (t_c + 1) / (t + 1)`` (1 when disabled)."""
    return 0.9 + 0.1 * (class_task + 1) / (task + 1) if enabled else 1.0


def alignment_lr(lr: float, epoch: int, epochs: int) -> float:
    """Cosine over the alignment epochs, stepped per epoch: ``lr * 0.5 * (1 + cos(pi * epoch / epochs))``."""
    return lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def normalise_logits(logits: torch.Tensor, sizes: Sequence[int], temperature: float) -> torch.Tensor:
    """Divide each row of ``logits`` by (the mean over the consecutive logit groups ``sizes`` of each group's L2 norm,
    ``+ 1e-7``), then by ``temperature`` (the reference's logit normalisation)."""
    return _normalise(logits, _group_matrix(sizes, logits.shape[-1], logits.dtype, logits.device), temperature)


def _group_matrix(sizes: Sequence[int], count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(count, G)`` indicator of which group each logit belongs to."""
    sizes = [int(s) for s in sizes]
    if sum(sizes) != count:
        raise ValueError(f"logit group sizes {sizes} do not add up to {count} logits")
    groups = torch.arange(len(sizes), device=device).repeat_interleave(torch.tensor(sizes, device=device))
    return F.one_hot(groups, len(sizes)).to(dtype)


def _normalise(logits: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    # Group norms by one product with the indicator (a fixed number of operations whatever the number of tasks). The
    # clamp keeps the gradient of an all-zero group at 0 (as ``vector_norm``'s) instead of sqrt's infinite slope.
    norms = (logits.square() @ groups).clamp_min(1e-30).sqrt().mean(-1, keepdim=True)
    return logits / (norms + 1e-7) / temperature


def class_gaussians(stats: ClassStatistics, classes: Sequence[int], task: int, shrink: float, mean_scale: bool = True,
                    dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked sampling means ``s_c * mean_c`` (``(K, dim)``, ``s_c = class_mean_scale(stats.last_task[c], task)``)
    and Cholesky factors of ``cov_c + shrink * I`` (``(K, dim, dim)``) of ``classes`` at the current ``task``."""
    means, factors = stats.stacked(classes, shrink, dtype, device)
    scales = torch.tensor([class_mean_scale(stats.last_task[c], task, mean_scale) for c in classes], dtype=dtype)
    return means * scales.to(means.device).unsqueeze(1), factors


def draw_samples(means: torch.Tensor, factors: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` samples of each Gaussian ``N(means[k], factors[k] @ factors[k].T)``, shape ``(K, n, dim)``, in one
    batched product. The standard normals come from the CPU ``generator`` (one ``randn`` of ``(K, n, dim)``) and are
    moved to ``means``' device afterwards, so a seeded draw repeats on any device."""
    k, d = means.shape
    z = torch.randn(k, n, d, generator=generator, dtype=means.dtype).to(means.device)
    return torch.baddbmm(means.unsqueeze(1), z, factors.transpose(1, 2))


def align_linear(weight: torch.Tensor, bias: torch.Tensor, sizes: Sequence[int], stats: ClassStatistics,
                 classes: Sequence[int], task: int, options: AlignOptions,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Re-train a stacked linear classifier on Gaussian samples of ``classes``; returns ``(weight, bias, last loss)``.

    ``weight`` is ``(C, dim)`` and ``bias`` ``(C,)``; global class ``c`` is row ``c``. ``sizes`` are the per-task
    logit groups of the rows (``[C]`` for one shared head), used only by logit normalisation. ``task`` is the current
    task (0-based), for the mean scaling of each class by its ``stats.last_task``. The inputs are not modified.

    Each epoch: one draw of ``samples_per_class`` samples per class (``draw_samples``, then one ``randperm`` of all
    samples, both from ``generator``), SGD (momentum, weight decay) on consecutive batches of ``batch_size`` of the
    shuffled samples at ``alignment_lr(lr, epoch, epochs)``, cross-entropy over all ``C`` logits (normalised by
    ``normalise_logits`` when ``logit_norm`` is set). The same SGD, element for element, as training the per-task heads
    separately on the concatenated logits.
    """
    sizes = [int(s) for s in sizes]
    rows = weight.shape[0]
    if sum(sizes) != rows or bias.shape != (rows,):
        raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match sizes {sizes}")
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < rows or c not in stats.counts]
    if bad:
        raise ValueError(f"classes {bad[:5]} are outside the {rows} classifier rows or have no statistics")
    device, dtype = weight.device, weight.dtype
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    last = torch.full((), float("nan"))
    if not classes or options.epochs <= 0:
        return w.detach(), b.detach(), float(last)
    # Without logit normalisation the step is written out (softmax minus one-hot, torch's SGD update): the same
    # update as autograd + torch.optim.SGD up to rounding, at about 2/3 of the time of the Python-bound step.
    optimiser = None if options.logit_norm is None else torch.optim.SGD(
        [w, b], lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay, foreach=True)
    sgd = _PlainSoftmaxSGD(w, b, options.momentum, options.weight_decay)
    n, batch = int(options.samples_per_class), int(options.batch_size)
    with torch.no_grad():
        means, factors = class_gaussians(stats, classes, task, options.shrink, options.mean_scale, dtype, device)
        labels = torch.tensor(classes, device=device).repeat_interleave(n)
    norm = None
    if options.logit_norm is not None:
        norm = (_group_matrix(sizes, rows, dtype, device), float(options.logit_norm))
    for epoch in range(options.epochs):
        lr = alignment_lr(options.lr, epoch, options.epochs)
        with torch.no_grad():
            x = draw_samples(means, factors, n, generator).reshape(-1, weight.shape[1])
            order = torch.randperm(x.shape[0], generator=generator).to(device)
            x, y = x[order], labels[order]
        final = epoch == options.epochs - 1
        for i in range(0, x.shape[0], batch):
            if optimiser is None:
                loss = sgd.step(x[i : i + batch], y[i : i + batch], lr, final and i + batch >= x.shape[0])
                last = loss if loss is not None else last
                continue
            for group in optimiser.param_groups:
                group["lr"] = lr
            logits = F.linear(x[i : i + batch], w, b)
            if norm is not None:
                logits = _normalise(logits, *norm)
            loss = F.cross_entropy(logits, y[i : i + batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            last = loss.detach()
    return w.detach(), b.detach(), float(last)


class _PlainSoftmaxSGD:
    """SGD (momentum, weight decay; torch's update rule) on a linear layer's ``(w, b)`` under the mean
    cross-entropy, with the gradient written out: ``g = (softmax(x w^T + b) - onehot(y)) / n``, ``dw = g^T x``,
    ``db = sum g``. Updates ``w`` and ``b`` in place (their autograd flag is ignored)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, momentum: float, weight_decay: float) -> None:
        self.w, self.b = w, b
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, want_loss: bool) -> torch.Tensor | None:
        """One step on the batch ``(x, y)``; returns the batch's loss before the step when ``want_loss``."""
        w, b = self.w, self.b
        logits = torch.addmm(b, x, w.T)
        loss = F.cross_entropy(logits, y) if want_loss else None
        g = torch.softmax(logits, dim=1)
        g[torch.arange(y.shape[0], device=y.device), y] -= 1.0
        g /= y.shape[0]
        gw, gb = g.T @ x, g.sum(0)
        if self.weight_decay:
            gw.add_(w, alpha=self.weight_decay)
            gb.add_(b, alpha=self.weight_decay)
        if self.buffers is None or not self.momentum:
            self.buffers = (gw, gb)
        else:
            self.buffers[0].mul_(self.momentum).add_(gw)
            self.buffers[1].mul_(self.momentum).add_(gb)
        w.sub_(self.buffers[0], alpha=lr)
        b.sub_(self.buffers[1], alpha=lr)
        return loss

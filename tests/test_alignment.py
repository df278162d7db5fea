"""Classifier alignment (+CA): class statistics, Gaussian sampling, schedule, logit normalisation, alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from inflora import alignment
from inflora.alignment import (
    ClassStatistics,
    align_linear,
    alignment_lr,
    class_gaussians,
    class_mean_scale,
    draw_samples,
    normalise_logits,
)
from inflora.classifiers.aligned import AlignedOptions


def _stats(dim: int, tasks: list[list[int]], seed: int = 0, rows: int = 40) -> ClassStatistics:
    """Statistics of random, correlated features; ``tasks[t]`` are the classes added in task ``t``."""
    gen = torch.Generator().manual_seed(seed)
    stats = ClassStatistics(dim)
    for t, classes in enumerate(tasks):
        for c in classes:
            mix = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
            feats = torch.randn(rows, dim, generator=gen) @ mix + 2 * torch.randn(dim, generator=gen)
            stats.add(feats, torch.full((rows,), c), t)
    return stats


def test_class_statistics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 4))
    labels = rng.integers(0, 3, 50)
    stats = ClassStatistics(4, torch.device("cpu"))
    for i in range(0, 50, 7):  # in uneven batches
        stats.add(torch.from_numpy(feats[i : i + 7]).float(), torch.from_numpy(labels[i : i + 7]), task=1)
    for c in range(3):
        rows = feats[labels == c].astype(np.float32).astype(np.float64)
        mean, cov = stats.gaussian(c, shrink=1e-4)
        assert mean.dtype == cov.dtype == torch.float64
        assert np.allclose(mean.numpy(), rows.mean(0), atol=1e-6)
        assert np.allclose(cov.numpy(), np.cov(rows.T) + 1e-4 * np.eye(4), atol=1e-6)
    assert stats.last_task == {0: 1, 1: 1, 2: 1}


def test_last_task_is_the_latest_task_that_added_data() -> None:
    stats = ClassStatistics(2)
    stats.add(torch.randn(5, 2), torch.tensor([0, 0, 1, 1, 1]), task=0)
    stats.add(torch.randn(3, 2), torch.tensor([1, 2, 2]), task=2)  # class 1 seen again (a new domain)
    stats.add(torch.randn(2, 2), torch.tensor([2, 2]), task=1)  # out of order: keeps the latest
    assert stats.last_task == {0: 0, 1: 2, 2: 2}
    assert stats.counts == {0: 2, 1: 4, 2: 4}
    stats.add_moments(3, 0, torch.zeros(2), torch.zeros(2, 2), task=5)  # no rows: nothing recorded
    assert 3 not in stats.counts and 3 not in stats.last_task


def test_state_round_trip_and_old_states() -> None:
    stats = _stats(3, [[0, 1], [2], [1]])
    state = stats.state_dict()
    restored = ClassStatistics(3)
    restored.add(torch.randn(4, 3), torch.tensor([7, 7, 7, 7]), task=0)  # replaced by the load
    restored.load_state_dict(state)
    assert restored.counts == stats.counts and restored.last_task == {0: 0, 1: 2, 2: 1}
    for c in stats.counts:
        assert torch.equal(restored.sums[c], stats.sums[c]) and torch.equal(restored.outer[c], stats.outer[c])
        assert restored.sums[c].dtype == restored.outer[c].dtype == torch.float64
    old = {k: v for k, v in state.items() if not k.endswith(".last_task")}
    with pytest.raises(ValueError, match="no last task"):
        ClassStatistics(3).load_state_dict(old)


def test_class_mean_scale() -> None:
    assert class_mean_scale(0, 3) == pytest.approx(0.9 + 0.1 * 1 / 4)
    assert class_mean_scale(3, 3) == pytest.approx(1.0)
    assert class_mean_scale(0, 3, enabled=False) == 1.0
    stats = _stats(3, [[0], [1], [2], [3]])
    means, _ = class_gaussians(stats, [0, 3], 3, 1e-4, dtype=torch.float64)
    assert torch.allclose(means[0], 0.925 * stats.gaussian(0, 1e-4)[0])
    assert torch.allclose(means[1], stats.gaussian(3, 1e-4)[0])
    means, _ = class_gaussians(stats, [0, 3], 3, 1e-4, mean_scale=False, dtype=torch.float64)
    assert torch.allclose(means[0], stats.gaussian(0, 1e-4)[0])


def test_batched_samples_follow_the_scaled_class_gaussians() -> None:
    rng = np.random.default_rng(1)
    dim, shrink, n = 4, 0.05, 200_000
    data = {}
    stats = ClassStatistics(dim)
    for c, t in [(0, 0), (1, 1), (2, 2)]:
        basis = rng.standard_normal((2, dim))  # rank-2 features: the shrink is what makes the covariance full rank
        data[c] = rng.standard_normal((300, 2)) @ basis + rng.standard_normal(dim) * 3
        stats.add(torch.from_numpy(data[c]), torch.full((300,), c), task=t)
    means, factors = class_gaussians(stats, [2, 0, 1], task=2, shrink=shrink)
    samples = draw_samples(means, factors, n, torch.Generator().manual_seed(0)).double().numpy()
    assert samples.shape == (3, n, dim)
    for k, (c, t) in enumerate([(2, 2), (0, 0), (1, 1)]):
        scale = 0.9 + 0.1 * (t + 1) / 3
        expected_cov = np.cov(data[c].T) + shrink * np.eye(dim)
        spread = np.sqrt(np.diag(expected_cov))
        assert np.allclose(samples[k].mean(0), scale * data[c].mean(0), atol=0.02 * spread.max())
        assert np.allclose(np.cov(samples[k].T), expected_cov, atol=0.03 * np.abs(expected_cov).max())
        # the shrink: the variance along a direction orthogonal to the data is shrink, not 0
        null = np.linalg.svd(data[c] - data[c].mean(0))[2][-1]
        assert np.var(samples[k] @ null) == pytest.approx(shrink, rel=0.05)


def test_seeded_draws_repeat() -> None:
    stats = _stats(3, [[0, 1]])
    means, factors = class_gaussians(stats, [0, 1], 0, 1e-4)
    a = draw_samples(means, factors, 10, torch.Generator().manual_seed(3))
    b = draw_samples(means, factors, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, draw_samples(means, factors, 10, torch.Generator().manual_seed(4)))


def test_alignment_lr_is_cosine_per_epoch() -> None:
    assert alignment_lr(0.01, 0, 5) == pytest.approx(0.01)
    assert alignment_lr(0.01, 1, 5) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert alignment_lr(0.01, 4, 5) == pytest.approx(0.01 * 0.5 * (1 + math.cos(4 * math.pi / 5)))
    assert alignment_lr(0.02, 2, 4) == pytest.approx(0.01)


@pytest.mark.parametrize("logit_norm", [None, 0.1])
def test_align_linear_steps_at_the_epoch_lr(monkeypatch: pytest.MonkeyPatch, logit_norm: float | None) -> None:
    """Both step forms (written out without logit normalisation, torch's SGD with it) step at the epoch's lr."""
    recorded: list[float] = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            recorded.append(self.param_groups[0]["lr"])
            return super().step(closure)

    plain_step = alignment._PlainSoftmaxSGD.step

    def recording_plain_step(self, x, y, lr, want_loss):  # type: ignore[no-untyped-def]
        recorded.append(lr)
        return plain_step(self, x, y, lr, want_loss)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    monkeypatch.setattr(alignment._PlainSoftmaxSGD, "step", recording_plain_step)
    stats = _stats(3, [[0, 1], [2]])
    options = AlignedOptions(epochs=4, lr=0.05, samples_per_class=10, batch_size=8,  # 30 samples: 4 steps/epoch
                             logit_norm=logit_norm)
    align_linear(torch.zeros(3, 3), torch.zeros(3), [2, 1], stats, [0, 1, 2], 1, options, torch.Generator())
    assert recorded == pytest.approx([alignment_lr(0.05, e, 4) for e in range(4) for _ in range(4)])


def test_normalise_logits_by_hand() -> None:
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0], [0.0, 0.0, 6.0, 8.0]])
    # row 0: group norms 5 and 1, mean 3; row 1: 0 and 10, mean 5
    expected = torch.tensor([[3 / 3, 4 / 3, 0.0, 1 / 3], [0.0, 0.0, 6 / 5, 8 / 5]]) / 0.5
    assert torch.allclose(normalise_logits(logits, [2, 2], 0.5), expected, atol=1e-6)
    assert torch.allclose(normalise_logits(logits[:1], [4], 1.0), logits[:1] / math.sqrt(26), atol=1e-6)
    assert torch.allclose(normalise_logits(logits[:1], [1, 3], 1.0), logits[:1] / ((3 + math.sqrt(17)) / 2))
    zero_group = logits[1:].clone().requires_grad_(True)  # an all-zero group keeps a finite gradient
    normalise_logits(zero_group, [2, 2], 0.1).sum().backward()
    assert torch.isfinite(zero_group.grad).all()
    with pytest.raises(ValueError, match="add up"):
        normalise_logits(logits, [2, 1], 1.0)


def _separate_heads(weight, bias, sizes, stats, classes, task, options, generator):  # type: ignore[no-untyped-def]
    """The reference written out: per-task ``nn.Linear`` heads, per-class sampling, one optimiser per head."""
    heads = []
    for w, b in zip(torch.split(weight, sizes), torch.split(bias, sizes), strict=True):
        head = nn.Linear(w.shape[1], w.shape[0], dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        heads.append(head)
    optimisers = [torch.optim.SGD(h.parameters(), lr=options.lr, momentum=options.momentum,
                                  weight_decay=options.weight_decay) for h in heads]
    gaussians = {}
    for c in classes:
        mean, cov = stats.gaussian(c, options.shrink)
        scale = 0.9 + 0.1 * (stats.last_task[c] + 1) / (task + 1) if options.mean_scale else 1.0
        gaussians[c] = (scale * mean, torch.from_numpy(np.linalg.cholesky(cov.numpy())))
    n = options.samples_per_class
    for epoch in range(options.epochs):
        for opt in optimisers:
            opt.param_groups[0]["lr"] = options.lr * 0.5 * (1 + math.cos(math.pi * epoch / options.epochs))
        z = torch.randn(len(classes), n, weight.shape[1], generator=generator, dtype=weight.dtype)
        x = torch.cat([gaussians[c][0] + z[k] @ gaussians[c][1].T for k, c in enumerate(classes)])
        y = torch.tensor(classes).repeat_interleave(n)
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), options.batch_size):
            idx = order[i : i + options.batch_size]
            per_task = [h(x[idx]) for h in heads]
            logits = torch.cat(per_task, dim=1)
            if options.logit_norm is not None:
                norms = torch.stack([p.norm(dim=1) + 1e-7 for p in per_task], dim=1).mean(1, keepdim=True)
                logits = logits / norms / options.logit_norm
            loss = nn.functional.cross_entropy(logits, y[idx])
            for opt in optimisers:
                opt.zero_grad()
            loss.backward()
            for opt in optimisers:
                opt.step()
    return torch.cat([h.weight for h in heads]).detach(), torch.cat([h.bias for h in heads]).detach()


@pytest.mark.parametrize("logit_norm", [None, 0.1])
def test_stacked_training_equals_separate_heads(logit_norm: float | None) -> None:
    sizes, dim = [2, 3, 2], 5
    stats = _stats(dim, [[0, 1], [2, 3, 4], [5, 6]])
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(7, dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(7, generator=gen, dtype=torch.float64)
    classes = [0, 1, 2, 3, 4, 5, 6]
    options = AlignedOptions(epochs=3, samples_per_class=20, batch_size=16, logit_norm=logit_norm)  # last batch 12
    w, b, loss = align_linear(weight, bias, sizes, stats, classes, 2, options, torch.Generator().manual_seed(5))
    w_ref, b_ref = _separate_heads(weight, bias, sizes, stats, classes, 2, options, torch.Generator().manual_seed(5))
    assert not torch.allclose(w, weight, atol=1e-3)  # it trained
    assert torch.allclose(w, w_ref, atol=1e-6, rtol=0) and torch.allclose(b, b_ref, atol=1e-6, rtol=0)
    assert math.isfinite(loss)


@pytest.mark.parametrize("logit_norm", [None, 0.1])
def test_alignment_fixes_heads_biased_towards_the_last_task(logit_norm: float | None) -> None:
    torch.manual_seed(0)
    means = torch.eye(4) * 3
    stats = ClassStatistics(4)
    for c in range(4):
        stats.add(means[c] + 0.3 * torch.randn(100, 4), torch.full((100,), c), task=c // 2)
    weight = means.clone()
    bias = torch.tensor([0.0, 0.0, 12.0, 12.0])  # task 1's head dominates every input: old classes are never predicted
    x = torch.cat([means[c] + 0.3 * torch.randn(50, 4) for c in range(4)])
    y = torch.arange(4).repeat_interleave(50)
    before = (nn.functional.linear(x, weight, bias).argmax(-1) == y).float().mean()
    options = AlignedOptions(batch_size=32, logit_norm=logit_norm)
    w, b, _ = align_linear(weight, bias, [2, 2], stats, [0, 1, 2, 3], 1, options, torch.Generator().manual_seed(0))
    after = (nn.functional.linear(x, w, b).argmax(-1) == y).float().mean()
    assert before <= 0.5 and after > 0.95


def test_align_linear_repeats_and_leaves_its_inputs_alone() -> None:
    stats = _stats(4, [[0, 1, 2]])
    weight, bias = torch.randn(3, 4), torch.randn(3)
    weight_copy, bias_copy, state = weight.clone(), bias.clone(), stats.state_dict()
    options = AlignedOptions(epochs=2, samples_per_class=16, batch_size=8)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        return align_linear(weight, bias, [3], stats, [0, 1, 2], 0, options, torch.Generator().manual_seed(seed))

    w1, b1, loss1 = run(0)
    w2, b2, loss2 = run(0)
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and loss1 == loss2
    assert not torch.equal(w1, run(1)[0])
    assert torch.equal(weight, weight_copy) and torch.equal(bias, bias_copy)
    assert not (w1.requires_grad or b1.requires_grad or weight.requires_grad)
    after = stats.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_align_linear_rejects_mismatched_inputs() -> None:
    stats = _stats(2, [[0, 1]])
    options = AlignedOptions(epochs=1)
    with pytest.raises(ValueError, match="sizes"):
        align_linear(torch.zeros(2, 2), torch.zeros(2), [3], stats, [0, 1], 0, options, torch.Generator())
    with pytest.raises(ValueError, match="no statistics"):
        align_linear(torch.zeros(3, 2), torch.zeros(3), [3], stats, [0, 2], 0, options, torch.Generator())

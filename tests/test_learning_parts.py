"""Heads, classifier alignment and the length-grouped sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inflora.heads import TaskHeads

from inflora.alignment import ClassStatistics, align_heads
from inflora.config import AlignmentConfig
from inflora.engine import reference_cosine
from inflora.sampling import LengthGroupedBatches


def test_heads_concatenate_in_class_order() -> None:
    heads = TaskHeads(6)
    heads.add(2)
    heads.add(3)
    assert heads.offsets == [0, 2] and heads.num_classes == 5
    assert heads.task_of_class().tolist() == [0, 0, 1, 1, 1]
    x = torch.randn(4, 6)
    assert torch.equal(heads(x)[:, 2:], heads.task_logits(x, 1))
    assert heads(x, upto=0).shape == (4, 2)


def test_class_statistics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 4))
    labels = rng.integers(0, 3, 50)
    stats = ClassStatistics(4, torch.device("cpu"))
    for i in range(0, 50, 7):  # in uneven batches
        stats.add(torch.from_numpy(feats[i : i + 7]).float(), torch.from_numpy(labels[i : i + 7]))
    for c in range(3):
        rows = feats[labels == c].astype(np.float32).astype(np.float64)
        mean, cov = stats.gaussian(c, shrink=1e-4)
        assert np.allclose(mean.numpy(), rows.mean(0), atol=1e-6)
        assert np.allclose(cov.numpy(), np.cov(rows.T) + 1e-4 * np.eye(4), atol=1e-6)
    restored = ClassStatistics(4, torch.device("cpu"))
    restored.load_state_dict(stats.state_dict())
    assert restored.counts == stats.counts


def test_alignment_fixes_heads_biased_towards_the_last_task() -> None:
    torch.manual_seed(0)
    means = torch.eye(4) * 3
    stats = ClassStatistics(4, torch.device("cpu"))
    for c in range(4):
        stats.add(means[c] + 0.3 * torch.randn(100, 4), torch.full((100,), c))
    heads = TaskHeads(4)
    heads.add(2)
    heads.add(2)
    with torch.no_grad():  # task 1's head dominates every input: old classes are never predicted
        heads.heads[1].bias.fill_(4.0)
    x = torch.cat([means[c] + 0.3 * torch.randn(50, 4) for c in range(4)])
    y = torch.arange(4).repeat_interleave(50)
    before = (heads(x).argmax(-1) == y).float().mean()
    config = AlignmentConfig(enabled=True, epochs=5, samples_per_class=256, batch_size=32)
    align_heads(heads, stats, [0, 1, 2, 3], 1, config, torch.Generator().manual_seed(0))
    after = (heads(x).argmax(-1) == y).float().mean()
    assert before <= 0.5 and after > 0.95
    assert not any(p.requires_grad for p in heads.parameters())


def test_length_grouped_batches_cover_every_sample_once() -> None:
    lengths = list(np.random.default_rng(0).integers(1, 50, 203))
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=3, window=4)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203)) and len(batches) == len(sampler)
    assert batches == list(LengthGroupedBatches(lengths, 8, seed=3, window=4))
    assert batches != list(LengthGroupedBatches(lengths, 8, seed=4, window=4))
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches])
    assert spread < 20  # grouped: far less spread than random batches (~40)


def test_reference_cosine_schedule() -> None:
    assert reference_cosine(0, 20) == pytest.approx(1.0)
    assert reference_cosine(19, 20) == pytest.approx(np.cos(99 * np.pi / 200))
    assert reference_cosine(0, 1) == 1.0


def test_local_and_seen_losses() -> None:
    from torch import nn

    from inflora.config import RunConfig
    from inflora.learners import LEARNERS

    class Features(nn.Module):
        feature_dim = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    config = RunConfig()
    learner = LEARNERS["frozen"](Features(), config, 2, torch.device("cpu"))  # type: ignore[arg-type]
    learner.begin_task(0, 2, lambda: [])
    learner.begin_task(1, 2, lambda: [])
    x, y = torch.randn(5, 3), torch.tensor([2, 3, 2, 3, 2])
    local = learner.training_loss(x, y, 1)
    assert torch.allclose(local, nn.functional.cross_entropy(learner.heads.task_logits(x, 1), y - 2))
    config.train.loss = "seen"
    seen = learner.training_loss(x, y, 1)
    assert torch.allclose(seen, nn.functional.cross_entropy(learner.heads(x), y))
    assert {id(p) for p in learner.head_parameters(1)} == {id(p) for p in learner.heads.heads[1].parameters()}

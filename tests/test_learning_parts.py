"""Classifier components, losses, the reference cosine and the length-grouped sampler (alignment maths:
test_alignment.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from inflora.classifiers import CLASSIFIERS, ClassLayout
from inflora.classifiers.linear import LinearHeads, LinearOptions
from inflora.sampling import LengthGroupedBatches, PaddingBoundedBatches
from inflora.training import reference_cosine


def heads(kind: str = "class", sizes: tuple[int, ...] = (2, 3), loss: str = "local") -> LinearHeads:
    layout = ClassLayout.create(kind, sizes)
    return LinearHeads(6, layout, LinearOptions(loss=loss), torch.device("cpu"))  # type: ignore[arg-type]


def test_heads_concatenate_in_class_order() -> None:
    h = heads()
    h.begin_task(0)
    h.begin_task(1)
    assert h.sizes == [2, 3] and h.layout.num_classes == 5 and h.layout.offset(1) == 2
    assert h.layout.task_of_class().tolist() == [0, 0, 1, 1, 1]
    x = torch.randn(4, 6)
    assert torch.equal(h.logits(x, 1)[:, 2:], h.heads[1](x))
    assert h.logits(x, 0).shape == (4, 2)
    weight, bias = h.export_linear(1)
    assert torch.allclose(nn.functional.linear(x, weight, bias), h.logits(x, 1))


def test_local_and_seen_losses_and_trained_parameters() -> None:
    h = heads()
    h.begin_task(0)
    h.begin_task(1)
    x, y = torch.randn(5, 6), torch.tensor([2, 3, 2, 4, 2])
    local = h.loss(x, y, 1)
    assert torch.allclose(local, nn.functional.cross_entropy(h.heads[1](x), y - 2))
    seen = heads(loss="seen")
    seen.load_state_tensors(h.state_tensors())
    assert torch.allclose(seen.loss(x, y, 1), nn.functional.cross_entropy(h.logits(x, 1), y))
    assert {id(p) for p in h.parameters_for(1)} == {id(p) for p in h.heads[1].parameters()}
    assert {id(p) for p in h.parameters_for(1, all_seen=True)} == {id(p) for p in h.parameters()}


def test_domain_layout_has_one_shared_head() -> None:
    h = heads("domain", (3, 3, 3))
    for t in range(3):
        h.begin_task(t)
    assert len(h.heads) == 1 and h.layout.num_classes == 3 and h.layout.groups(2) == [3]
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    assert torch.allclose(h.loss(x, y, 2), nn.functional.cross_entropy(h.heads[0](x), y))
    tasks = torch.tensor([0, 2, 1, 1])
    assert h.layout.within_task(tasks, 3).all() and h.layout.same_task(torch.tensor([2, 0, 1, 1]), tasks).all()


def test_class_state_round_trip() -> None:
    h = heads()
    h.begin_task(0)
    h.begin_task(1)
    again = heads()
    again.load_state_tensors(h.state_tensors())
    x = torch.randn(3, 6)
    assert torch.equal(again.logits(x, 1), h.logits(x, 1))
    with pytest.raises(RuntimeError, match="fresh"):
        again.load_state_tensors(h.state_tensors())


def test_classifier_registry() -> None:
    assert {"linear", "aligned"} <= set(CLASSIFIERS)
    with pytest.raises(KeyError, match="valid: aligned, linear"):
        CLASSIFIERS.get("nope")


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


def test_padding_bounded_batches_keep_the_order_and_bound_padding() -> None:
    lengths = sorted(int(n) for n in np.random.default_rng(1).integers(5, 110, 300))
    batches = list(PaddingBoundedBatches(lengths, batch_size=64, slack=0.1))
    assert [i for b in batches for i in b] == list(range(300))  # every sample once, in pass order
    assert all(len(b) <= 64 for b in batches)
    for b in batches:
        padded, real = len(b) * lengths[b[-1]], sum(lengths[i] for i in b)
        # a batch grows past a quarter of the batch size only while padding stays within the slack
        assert len(b) <= 16 or padded <= 1.1 * real + 1e-9
    one = [i for b in PaddingBoundedBatches(lengths[:100], batch_size=128) for i in b]
    assert len(list(PaddingBoundedBatches(lengths[:100], batch_size=128))) > 1 and one == list(range(100))
    assert list(PaddingBoundedBatches([7] * 10, batch_size=4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="ascending"):
        PaddingBoundedBatches([3, 1, 2], batch_size=4)


def test_reference_cosine_schedule() -> None:
    assert reference_cosine(0, 20) == pytest.approx(1.0)
    assert reference_cosine(19, 20) == pytest.approx(np.cos(99 * np.pi / 200))
    assert reference_cosine(0, 1) == 1.0

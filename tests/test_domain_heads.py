"""benchmarks/domain_heads.py: its mixture alignment reduces to the product's alignment with one Gaussian per class,
its ridge head is the least-squares solution, its pooled prototype head predicts what the product's ``prototype``
classifier predicts, per-domain prototypes keep a domain that pooled ones lose, and a tiny run gives one accuracy row
per domain."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from inflora.alignment import ClassStatistics, align_linear
from inflora.classifiers.base import ClassLayout
from inflora.classifiers.prototype import PrototypeClassifier

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("domain_heads", ROOT / "benchmarks" / "domain_heads.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def features(seed: int = 0, domains: int = 2, classes: int = 3, per: int = 20, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(domains, classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(per).repeat(domains)
    d = torch.arange(domains).repeat_interleave(classes * per)
    x = centres[d, y] + torch.randn(len(y), dim, generator=g)
    return x, y, d


def test_mixture_with_one_component_per_class_is_the_products_alignment() -> None:
    bench = load_benchmark()
    x, y, _d = features(domains=1)
    stats = ClassStatistics(x.shape[1])
    stats.add(x, y, 0)
    budget = bench.Budget(epochs=3, samples_per_class=16, batch_size=8)
    w0, b0 = torch.zeros(3, x.shape[1]), torch.zeros(3)
    w_ref, b_ref, _ = align_linear(w0, b0, [3], stats, stats.classes, 0, budget, torch.Generator().manual_seed(1))
    w, b = bench.mixture_align(w0, b0, stats, stats.classes, stats.classes, 0, budget,
                               torch.Generator().manual_seed(1))
    assert torch.allclose(w, w_ref, atol=1e-5) and torch.allclose(b, b_ref, atol=1e-5)
    assert w.abs().sum() > 0


def test_ridge_head_is_the_least_squares_solution() -> None:
    bench = load_benchmark()
    x, y, d = features()
    lam = 0.5
    w, b = bench.ridge_head(bench.Features(x, y, d), 0, 3, lam)
    sel = d == 0
    a = torch.cat([x[sel].double(), lam ** 0.5 * torch.eye(x.shape[1], dtype=torch.float64)])
    t = torch.cat([torch.nn.functional.one_hot(y[sel], 3).double(), torch.zeros(x.shape[1], 3, dtype=torch.float64)])
    expected = torch.linalg.lstsq(a, t).solution.T.float()
    assert torch.allclose(w, expected, atol=1e-4) and not b.any()


def test_pooled_prototypes_predict_what_the_products_prototype_classifier_predicts() -> None:
    bench = load_benchmark()
    x, y, d = features(domains=2, classes=4, per=10, dim=5)
    product = PrototypeClassifier(5, ClassLayout.create("domain", [4, 4]), None, torch.device("cpu"))
    for t in range(2):
        product.observe(x[d == t], y[d == t], t)
        product.end_task(t, 0)
        w, b = bench.prototype_head(bench.Features(x, y, d), t, 4, per_domain=False)
        ours = torch.nn.functional.normalize(x, dim=1) @ w.T + b
        assert torch.allclose(ours, product.logits(x, t), atol=1e-5)


def test_per_domain_prototypes_keep_a_concentrated_domain_that_pooled_ones_lose() -> None:
    """Domain 1 is what ciphered text looks like to the encoder: short features near one shared direction with small
    class offsets; pooled means are then the wide domain 0's, and domain 1's samples fall to the wrong classes."""
    bench = load_benchmark()
    g = torch.Generator().manual_seed(0)
    classes, per, dim = 6, 30, 8
    y = torch.arange(classes).repeat_interleave(per)
    wide = torch.randn(classes, dim, generator=g) * 4
    shared = torch.randn(dim, generator=g) * 2
    narrow = shared + torch.randn(classes, dim, generator=g) * 0.4
    x = torch.cat([wide[y], narrow[y]]) + 0.1 * torch.randn(2 * len(y), dim, generator=g)
    data = bench.Features(x, y.repeat(2), torch.arange(2).repeat_interleave(len(y)))
    pooled = bench.run_head("prototype", data, data, classes, 2, bench.Budget(), 1.0, 0)
    split = bench.run_head("prototype-domain", data, data, classes, 2, bench.Budget(), 1.0, 0)
    assert split[-1][1] > 90 and split[-1][0] > 90
    assert pooled[-1][1] < split[-1][1] - 20


def test_domain_statistics_against_hand_computed_values() -> None:
    bench = load_benchmark()
    x = torch.tensor([[3.0, 0.0], [5.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    data = bench.Features(x, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))
    first, second = bench.domain_statistics(data, 2)
    assert first == pytest.approx({"norm": 4.0, "mean_direction_energy": 1.0, "class_mean_spread": 1.0})
    # domain 1: unit features at right angles, mean direction at 45 degrees to each: half the energy along it
    assert second == pytest.approx({"norm": 1.0, "mean_direction_energy": 0.5, "class_mean_spread": 0.5**0.5})


@pytest.mark.parametrize("head", ["pooled", "mixture", "ridge", "prototype", "prototype-domain"])
def test_a_tiny_run_gives_one_row_per_domain_and_learns(head: str) -> None:
    bench = load_benchmark()
    train, test = bench.Features(*features(0)), bench.Features(*features(0))
    matrix = bench.run_head(head, train, test, 3, 2, bench.Budget(epochs=5, lr=0.1, samples_per_class=32), 1.0, 0)
    assert [len(row) for row in matrix] == [1, 2]
    assert matrix[0][0] > 60  # three well-separated classes, chance is 33 %


def test_bad_heads_are_refused() -> None:
    bench = load_benchmark()
    with pytest.raises(SystemExit):
        bench.main(["--heads", "pooled,nope"])

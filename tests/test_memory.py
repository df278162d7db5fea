"""Subspace memory (GPM / DualGPM) against an independent implementation of the specification's formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import inflora
from inflora.adapter.memory import threshold


def reference_update(feature: np.ndarray | None, mode: str, c: np.ndarray, eps: float, dual: bool,
                     energy: str) -> tuple[np.ndarray, str]:
    """Section 4 of the method spec, written out plainly with numpy."""
    d = c.shape[0]
    e = (lambda s: s**2) if energy == "faithful" else (lambda s: s)
    u, s, _ = np.linalg.svd(c)
    total = e(s).sum()
    if feature is None:
        ratio = np.cumsum(e(s)) / total
        k = max(1, int(np.sum(ratio < eps)))
        feature, mode = u[:, :k], "basis"
    elif mode == "basis":
        c_hat = c - feature @ feature.T @ c
        uh, sh, _ = np.linalg.svd(c_hat)
        acc = (total - e(sh).sum()) / total
        r = 0
        for value in e(sh) / total:
            if acc < eps:
                acc += value
                r += 1
            else:
                break
        if r:
            feature = np.hstack([feature, uh[:, :r]])[:, :d]
    else:
        c_hat = feature @ feature.T @ c
        uh, sh, _ = np.linalg.svd(c_hat)
        acc = e(sh).sum() / total
        r = 0
        for value in e(sh) / total:
            if acc >= 1 - eps:
                acc -= value
                r += 1
            else:
                break
        if r:
            shrunk = feature - uh[:, :r] @ uh[:, :r].T @ feature
            ui, _, _ = np.linalg.svd(shrunk)
            feature = ui[:, : feature.shape[1] - r]
    if dual and mode == "basis" and feature.shape[1] > d / 2:
        uf, _, _ = np.linalg.svd(feature)
        feature, mode = uf[:, feature.shape[1] :], "complement"
    return feature, mode


def random_moment(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    h = rng.standard_normal((d, n)) * (0.7 ** np.arange(d))[:, None] + rng.standard_normal((d, 1))
    h = rng.standard_normal((d, d)) @ h  # a rotated, decaying spectrum
    return h @ h.T / n


@pytest.mark.parametrize("dual", [True, False])
@pytest.mark.parametrize("energy", ["faithful", "gpm"])
def test_memory_update_matches_the_specification(dual: bool, energy: str) -> None:
    rng = np.random.default_rng(0)
    d, num_tasks = 24, 8
    memory = inflora.SubspaceMemory(d, dual=dual, energy=energy)
    feature, mode = None, "basis"
    modes = set()
    for t in range(num_tasks):
        c = random_moment(rng, d, 60)
        eps = threshold(t, num_tasks, 0.999 if energy == "faithful" else 0.9, 1.0)
        feature, mode = reference_update(feature, mode, c, eps, dual, energy)
        memory.update(torch.from_numpy(c), eps)
        assert memory.mode == mode
        assert memory.size == feature.shape[1]
        ours = memory.basis.numpy()
        assert np.allclose(ours @ ours.T, feature @ feature.T, atol=1e-8)  # same subspace (bases differ in sign)
        modes.add(mode)
    if dual:
        assert modes == {"basis", "complement"}  # the schedule exercised both modes
    else:
        assert modes == {"basis"}


def test_threshold_schedule() -> None:
    assert threshold(0, 10, 0.95, 1.0) == pytest.approx(0.95)
    assert threshold(5, 10, 0.95, 1.0) == pytest.approx(0.975)
    assert threshold(3, None, 0.98, 1.0) == pytest.approx(0.98)


def test_projectors_are_idempotent_and_modes_agree() -> None:
    torch.manual_seed(0)
    d = 16
    memory = inflora.SubspaceMemory(d)
    memory.load(torch.linalg.qr(torch.randn(d, 5, dtype=torch.float64))[0], "basis")
    p = memory.old_projector()
    assert torch.allclose(p @ p, p, atol=1e-12)
    q = memory.new_projector()
    assert torch.allclose(q @ q, q, atol=1e-12) and torch.allclose(p @ q, torch.zeros_like(p), atol=1e-12)
    full, _, _ = torch.linalg.svd(memory.basis, full_matrices=True)
    complement = inflora.SubspaceMemory(d)
    complement.load(full[:, 5:], "complement")
    assert torch.allclose(complement.old_projector(), p, atol=1e-12)
    c = torch.randn(d, d, dtype=torch.float64)
    assert torch.allclose(complement.remove_old(c), memory.remove_old(c), atol=1e-12)
    assert memory.memory_dim == complement.memory_dim == 5


def test_switch_happens_past_half_and_memory_never_exceeds_d() -> None:
    torch.manual_seed(0)
    d = 12
    memory = inflora.SubspaceMemory(d)
    history = []
    for _ in range(6):
        h = torch.randn(d, 200, dtype=torch.float64)
        memory.update(h @ h.T / 200, eps=0.9999)
        history.append((memory.mode, memory.memory_dim))
        assert memory.memory_dim <= d and memory.size <= d
        if memory.mode == "basis":
            assert memory.size <= d / 2
        else:
            assert memory.memory_dim > d / 2
    assert history[-1][0] == "complement"
    gpm = inflora.SubspaceMemory(d, dual=False)
    for _ in range(6):
        h = torch.randn(d, 200, dtype=torch.float64)
        gpm.update(h @ h.T / 200, eps=0.9999)
        assert gpm.mode == "basis" and gpm.size <= d


def test_bad_moments_are_refused() -> None:
    memory = inflora.SubspaceMemory(4)
    with pytest.raises(ValueError, match="shape"):
        memory.update(torch.eye(3), 0.9)
    with pytest.raises(ValueError, match="NaN"):
        memory.update(torch.full((4, 4), float("nan")), 0.9)
    with pytest.raises(ValueError, match="energy"):
        inflora.SubspaceMemory(4, energy="bogus")  # type: ignore[arg-type]

"""The energy meter: the share of each old task's input energy outside the subspace memory, against an independent
computation from explicit input matrices; its extremes; its factor's tolerance; the learner's diagnostics and state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import inflora
from conftest import TINY_VIT_OVERRIDES, make_image_folder, mlp
from inflora.adapter import EnergyMeter, energy_factor, energy_outside
from inflora.config import ConfigError, load_config
from inflora.engine import Experiment
from inflora.learners.lora import InfLoRAOptions

ROUNDING = 1e-6
"""The meter stores its factors in float32: shares carry rounding errors of order 1e-7."""


def true_share(h: torch.Tensor, basis: torch.Tensor) -> float:
    """``tr((I - P) H H^T) / tr(H H^T)`` with ``P = B B^T``, written out plainly."""
    c = h @ h.T
    outside = torch.eye(len(c), dtype=torch.float64) - basis @ basis.T
    return float(torch.trace(outside @ c) / torch.trace(c))


def low_rank_inputs(dim: int, rank: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``dim x n`` inputs spanning a random ``rank``-dimensional subspace, plus small full-rank noise."""
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0]
    scales = torch.logspace(0.5, 0, rank, dtype=torch.float64)
    h = basis @ (scales[:, None] * torch.randn(rank, n, generator=generator, dtype=torch.float64))
    return h + 1e-3 * torch.randn(dim, n, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("tolerance", [0.0, 1e-2])
def test_share_equals_an_independent_computation_in_both_memory_modes(tolerance: float) -> None:
    generator = torch.Generator().manual_seed(0)
    adapter = inflora.attach(mlp(), targets=r"^(0|2)$", rank=2, num_tasks=4, lamb=0.999, lame=1.0)
    meter = EnergyMeter(tolerance)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in adapter.sites}
    modes = set()
    for task in range(4):
        stats = {}
        for name, site in adapter.sites.items():
            h = low_rank_inputs(site.dim, 5, 40, generator)
            inputs[name].append(h)
            stats[name] = h @ h.T / h.shape[1]
        adapter.begin_task(stats)
        adapter.end_task(stats)
        meter.record(task, stats)
        shares = meter.shares(adapter, task)
        for name in adapter.sites:
            basis = adapter.old_space(name)
            modes.add(adapter.sites[name].memory.mode)
            for j in range(task + 1):
                exact = true_share(inputs[name][j], basis)
                # never below the true share, above it by at most the tolerance (and float32 storage's rounding)
                assert exact - ROUNDING <= shares[name][j] <= exact + tolerance + ROUNDING, (task, name, j)
    assert modes == {"basis", "complement"}  # the 16-wide site switches to DualGPM's complement mode


@pytest.mark.parametrize("mode", ["basis", "complement"])
def test_share_is_zero_inside_the_memory_and_one_orthogonal_to_it(mode: str) -> None:
    generator = torch.Generator().manual_seed(1)
    adapter = inflora.attach(mlp(), targets=r"^0$", rank=2)
    (name, site), = adapter.sites.items()
    q = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64))[0]
    memory_space, other = q[:, :10], q[:, 10:]
    site.memory.load(memory_space if mode == "basis" else other, mode)  # the same old space, stored either way
    meter = EnergyMeter(0.0)
    inside = memory_space @ torch.randn(10, 30, generator=generator, dtype=torch.float64)
    orthogonal = other @ torch.randn(6, 30, generator=generator, dtype=torch.float64)
    for task, h in enumerate((inside, orthogonal)):
        meter.record(task, {name: h @ h.T / 30})
    shares = meter.shares(adapter, 1)[name]
    assert shares[0] == pytest.approx(0.0, abs=ROUNDING)
    assert shares[1] == pytest.approx(1.0, abs=ROUNDING)
    empty = inflora.attach(mlp(), targets=r"^0$", rank=2)  # no memory yet: everything is outside
    assert meter.shares(empty, 1)[next(iter(empty.sites))] == [1.0, 1.0]


def test_gpm_rule_bounds_the_share_by_the_threshold_and_the_faithful_rule_does_not() -> None:
    """Classic GPM keeps at least ``eps_t`` of a task's input energy ``tr(C_t)`` in the memory, so right after the
    task its share outside is at most ``1 - eps_t``. The faithful rule weighs directions by ``S**2``: on inputs
    dominated by their mean direction it keeps that one direction and leaves far more outside."""
    generator = torch.Generator().manual_seed(3)
    shares, bounds = {}, []
    for energy in ("gpm", "faithful"):
        adapter = inflora.attach(mlp(), targets=r"^0$", rank=2, num_tasks=3, lamb=0.9, lame=0.99, energy=energy)
        (name, _), = adapter.sites.items()
        meter = EnergyMeter(0.0)
        shares[energy] = []
        for task in range(3):
            mean = torch.randn(16, 1, generator=generator, dtype=torch.float64)
            h = 3.0 * mean / mean.norm() + 0.3 * torch.randn(16, 200, generator=generator, dtype=torch.float64)
            stats = {name: h @ h.T / 200}
            adapter.begin_task(stats)
            if energy == "gpm":
                bounds.append(1.0 - adapter.threshold())
            adapter.end_task(stats)
            meter.record(task, stats)
            shares[energy].append(meter.shares(adapter, task)[name][task])
    # from the second task on (GPM's first update keeps the directions *before* the cumulative share reaches eps_0,
    # measured 0.102 against 1 - eps_0 = 0.1)
    assert all(0.0 < s <= b + ROUNDING for s, b in zip(shares["gpm"][1:], bounds[1:], strict=True)), (shares, bounds)
    # measured 0.121 and 0.109 against 0.07 and 0.04: the faithful rule keeps the mean direction and little else
    assert all(s > b + 0.03 for s, b in zip(shares["faithful"][1:], bounds[1:], strict=True)), (shares, bounds)


def test_factor_keeps_the_fewest_directions_within_the_tolerance() -> None:
    q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
    values = torch.tensor([8.0, 4.0, 2.0, 0.5, 0.25, 0.25], dtype=torch.float64)  # trace 15; tails 7, 3, 1, .5, .25
    c = q @ torch.diag(values) @ q.T
    for tolerance, keep in ((0.0, 6), (0.3 / 15, 5), (0.6 / 15, 4), (1.2 / 15, 3), (0.5, 1)):
        factor, trace = energy_factor(c, tolerance)
        assert factor.shape == (6, keep), tolerance
        assert trace == pytest.approx(15.0)
        assert float(factor.pow(2).sum()) == pytest.approx(float(values[:keep].sum()))
    full, _ = energy_factor(c, 0.0)
    assert torch.allclose(full @ full.T, c, atol=1e-12)
    with pytest.raises(ValueError, match="tolerance"):
        energy_factor(c, 1.0)
    with pytest.raises(ValueError, match="no energy"):
        energy_factor(torch.zeros(3, 3), 0.0)
    with pytest.raises(ValueError, match="trace"):
        energy_outside(full, 0.0, q[:, :2])


# ------------------------------------------------------------------------------------------ in a run
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), classes=6)


def tiny(root: Path, *extra: str):
    return load_config("clinc150", [*TINY_VIT_OVERRIDES, f"data.options={{root: {root}}}", "scenario.num_tasks=3",
                                    "train.epochs=1", "train.lr=0.01", "classifier=linear", *extra])


def test_inflora_reports_the_shares_and_keeps_the_factors_in_its_state(images: Path) -> None:
    experiment = Experiment(tiny(images))
    results = experiment.run()
    learner = experiment.learner
    sites = list(learner.adapter.sites)
    for t, d in enumerate(results["diagnostics"]):
        assert set(d["energy_outside"]) == set(sites)
        per_site = [d["energy_outside"][s] for s in sites]
        assert all(len(v) == t + 1 and all(0.0 <= x <= 1.0 for x in v) for v in per_site)
        figures = d["per_old_task"]
        for j in range(t + 1):
            assert figures["energy_outside_mean"][j] == pytest.approx(sum(v[j] for v in per_site) / len(sites))
            assert figures["energy_outside_max"][j] == max(v[j] for v in per_site)
        assert set(d["meter_dims"]) == set(sites) and d["meter_s"] > 0
    final = learner.meter.shares(learner.adapter, 2)
    assert final == results["diagnostics"][-1]["energy_outside"]
    # round trip: a fresh learner loaded with the state measures the same, and predicts the same
    fresh = Experiment(tiny(images))
    fresh.learner.load_state_dict(learner.state_dict())
    assert fresh.learner.meter.shares(fresh.learner.adapter, 2) == final
    inputs = next(iter(experiment.data.eval_pass(2)[0]))[0]
    learner.train_mode(False)
    fresh.learner.train_mode(False)
    with torch.no_grad():
        assert torch.equal(learner.predict(inputs, 2), fresh.learner.predict(inputs, 2))


def test_meter_off_and_bad_tolerance(images: Path) -> None:
    experiment = Experiment(tiny(images, "scenario.num_tasks=2", "inflora.energy_meter=false"))
    experiment.run_task(0)
    assert "energy_outside" not in experiment.state.diagnostics[0]
    assert not any(k.startswith("meter.") for k in experiment.learner.state_dict())
    with pytest.raises(ConfigError, match=r"meter_tolerance must lie in \[0, 1\)"):
        tiny(images, "inflora.meter_tolerance=1.5")
    with pytest.raises(ValueError, match="unexpected meter state entry"):
        EnergyMeter(0.0).load_state_dict({"bogus": torch.zeros(1)}, ["a"], [4])


def test_stats_products_option(images: Path) -> None:
    """float32 batch products by default, float64 on request; anything else is refused by name."""
    default = Experiment(tiny(images, "scenario.num_tasks=2"))
    assert default.learner._collector().products == torch.float32
    exact = Experiment(tiny(images, "scenario.num_tasks=2", "inflora.stats_products=float64"))
    assert exact.learner._collector().products == torch.float64
    with pytest.raises(ConfigError, match=r"stats_products: 'float16' is not one of float32, float64"):
        tiny(images, "inflora.stats_products=float16")
    with pytest.raises(ValueError, match=r"stats_products must be one of \['float32', 'float64'\]"):
        InfLoRAOptions(stats_products="float16").validate()  # the Python API checks too

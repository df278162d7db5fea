"""``train.amp``: bfloat16 autocast on GPU by default, on the CPU too with ``always``, recorded in results.json."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import inflora
from conftest import TINY_VIT_OVERRIDES, for_method, make_image_folder, mlp
from inflora import runtime
from inflora.config import ConfigError, load_config
from inflora.engine import Experiment
from inflora.runtime import Runtime, autocast_enabled

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("amp", "device", "enabled"), [
    (True, CPU, False), (True, CUDA, True), (False, CPU, False), (False, CUDA, False),
    ("always", CPU, True), ("always", CUDA, True),
])
def test_amp_setting_decides_autocast_per_device(amp: bool | str, device: torch.device, enabled: bool) -> None:
    assert autocast_enabled(amp, device) is enabled


def test_unknown_amp_value_is_an_error() -> None:
    with pytest.raises(ValueError, match="true, false or 'always'"):
        autocast_enabled("cpu", CPU)
    with pytest.raises(ConfigError, match=r"train\.amp"):
        load_config("clinc150", ["train.amp=cpu"])
    assert load_config("clinc150", ["train.amp=always"]).train.amp == "always"
    assert load_config("clinc150", ["train.amp=false"]).train.amp is False
    assert load_config("clinc150", []).train.amp is True  # the default: float32 on the CPU


def test_cpu_autocast_computes_linear_layers_in_bfloat16() -> None:
    layer, x = nn.Linear(8, 4), torch.randn(3, 8)
    with Runtime.create("cpu", amp="always").autocast():
        assert layer(x).dtype == torch.bfloat16
    with Runtime.create("cpu", amp=True).autocast():
        assert layer(x).dtype == torch.float32
    assert Runtime.create("cpu", amp="always").precision == "bfloat16 autocast"
    assert Runtime.create("cpu", amp=True).precision == "float32"


def test_cpu_without_bfloat16_units_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        Runtime.create("cpu", amp="always")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime.create("cpu", amp=True)  # float32 on the CPU: nothing to warn about


def test_statistics_under_cpu_autocast_stay_float64_and_close() -> None:
    """The forward runs in bfloat16; the moments are still accumulated in float64, within bfloat16's rounding."""
    model = mlp()
    adapter = inflora.attach(model, targets=r"^2$", rank=2)  # the second layer: its input comes from a bf16 product
    x = torch.randn(400, 16)
    loader = [(x[i:i + 100], None) for i in range(0, 400, 100)]
    exact = inflora.collect_input_stats(model, adapter, loader)
    cast = inflora.collect_input_stats(model, adapter, loader, autocast=True)
    for name in exact:
        assert cast[name].dtype == torch.float64
        err = float((cast[name] - exact[name]).norm() / exact[name].norm())
        assert 0 < err < 2e-2  # bfloat16 rounding happened (8-bit mantissa), and stays at its scale


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def test_run_with_cpu_autocast_learns_and_records_its_precision(images: Path) -> None:
    def run(amp: str) -> dict:
        config = load_config("clinc150", for_method([
            *TINY_VIT_OVERRIDES, f"data.options={{root: {images}}}", "scenario.num_tasks=2", "scenario.order=natural",
            "train.epochs=2", "train.lr=0.01", "train.device=cpu", f"train.amp={amp}"]))
        return Experiment(config).run()

    cast, exact = run("always"), run("true")
    assert cast["precision"] == "bfloat16 autocast" and exact["precision"] == "float32"
    assert cast["config"]["train"]["amp"] == "always"
    assert cast["task_il_accuracy"] >= 90.0  # coloured classes stay learnable in bfloat16 (measured 100)
    assert exact["task_il_accuracy"] >= 90.0

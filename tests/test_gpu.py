"""CUDA paths: statistics, design and merge on the GPU agree with the CPU; runs with mixed precision; checkpoints
written on the GPU restore on the CPU. Skipped without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import inflora
from conftest import TINY_VIT_OVERRIDES, for_method, make_image_folder, tiny_vit
from inflora.config import load_config
from inflora.engine import Experiment
from test_adapter import batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def full_float32():
    """No TF32 (cuDNN uses it for the patch-embedding convolution by default): GPU and CPU then differ only by
    summation order."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def two_tasks(device: str) -> tuple[torch.nn.Module, inflora.InfLoRAAdapter, list[dict[str, torch.Tensor]],
                                    list[dict[str, torch.Tensor]]]:
    """Two tasks of design + fixed up-projection + memory update on ``device``: the model, the adapter, the designed
    D and the input statistics of each task."""
    torch.manual_seed(0)
    xs = [torch.rand(16, 3, 32, 32), torch.rand(16, 3, 32, 32) * 0.5]
    model = tiny_vit().to(device)
    adapter = inflora.attach(model, preset="timm-vit-kv", rank=4, num_tasks=2)
    designs, stats = [], []
    for t, x in enumerate(xs):
        x = x.to(device)
        c = inflora.collect_input_stats(model, adapter, batches(x))
        stats.append({k: v.cpu() for k, v in c.items()})
        designs.append({k: v.cpu() for k, v in adapter.begin_task(c).items()})
        # U = M D^T with a fixed M: the update U D = M D^T D depends on D's row space only, not on the signs or
        # the rotation an SVD picks for D (which differ between devices).
        gen = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for layer in adapter.layers().values():
                branch = layer.branch(t)
                m = torch.randn(branch.up.shape[0], branch.down.shape[1], generator=gen).to(device)
                branch.up.copy_(m @ branch.down.T * 0.5)
        adapter.end_task(inflora.collect_input_stats(model, adapter, batches(x)))
    return model, adapter, designs, stats


def same_subspace(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest deviation between the projectors onto the row spaces of ``a`` and ``b`` (rows scaled alike)."""
    pa, pb = a.double().T @ a.double(), b.double().T @ b.double()
    return float((pa - pb).abs().max() / pa.abs().max())


def captured(d: torch.Tensor, c: torch.Tensor) -> float:
    """Second moment that the rows of ``d`` capture: trace(D C D^T)."""
    return float(torch.trace(d.double() @ c.double() @ d.double().T))


def test_gpu_statistics_design_and_memory_match_the_cpu() -> None:
    model_c, adapter_c, d_cpu, s_cpu = two_tasks("cpu")
    model_g, adapter_g, d_gpu, s_gpu = two_tasks("cuda")
    for t in range(2):
        for name in d_cpu[t]:
            diff = float((s_cpu[t][name] - s_gpu[t][name]).norm() / s_cpu[t][name].norm())
            assert diff < 1e-4, (t, name, diff)
            # The first design has no memory: its subspace is well separated and must match. After the memory
            # update the leading singular values of the projected statistics can be close together, so compare
            # what the designs capture instead of their bases.
            if t == 0:
                assert same_subspace(d_cpu[t][name], d_gpu[t][name]) < 1e-3, name
            assert captured(d_gpu[t][name], s_cpu[t][name]) == pytest.approx(
                captured(d_cpu[t][name], s_cpu[t][name]), rel=1e-3), (t, name)
    assert adapter_c.memory_dims() == adapter_g.memory_dims()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model_c(x), model_g(x.cuda()).cpu(), atol=1e-4)


def test_gpu_adapter_state_restores_on_the_cpu(tmp_path: Path) -> None:
    model_g, adapter_g, _, _ = two_tasks("cuda")
    save_file(adapter_g.state_dict(), tmp_path / "adapter.safetensors")
    model_c = tiny_vit()
    adapter_c = inflora.attach(model_c, preset="timm-vit-kv", rank=4, num_tasks=2)
    adapter_c.load_state_dict(load_file(tmp_path / "adapter.safetensors"))
    assert adapter_c.memory_dims() == adapter_g.memory_dims()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model_c(x), model_g(x.cuda()).cpu(), atol=1e-4)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def gpu_config(root: Path, *extra: str):
    return load_config("clinc150", for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {root}}}",
                                               "scenario.num_tasks=2", "scenario.order=natural", "train.epochs=2",
                                               "train.lr=0.01", "train.device=cuda", "classifier=aligned",
                                               "aligned.epochs=1", *extra]))


@pytest.mark.parametrize("amp", [True, False])
def test_gpu_run_with_and_without_mixed_precision(images: Path, amp: bool) -> None:
    results = Experiment(gpu_config(images, f"train.amp={str(amp).lower()}")).run()
    assert results["config"]["train"]["amp"] is amp and results["device"].startswith("cuda")
    acc = results["accuracy_matrix"]
    assert [len(r) for r in acc] == [1, 2] and all(0.0 <= a <= 100.0 for row in acc for a in row)
    assert results["task_il_accuracy"] >= 90.0  # measured 100 on the CPU
    assert results["diagnostics"][-1]["memory_dims"]


@pytest.mark.parametrize("method", ["seqlora", "joint", "frozen"])
def test_gpu_every_learner_runs(images: Path, method: str) -> None:
    results = Experiment(gpu_config(images, f"method={method}")).run()
    assert len(results["accuracy_matrix"]) == 2


def test_gpu_run_interrupted_resumes_on_the_cpu(images: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from inflora import faults
    from inflora.cli import main

    out = tmp_path / "run"
    sets = [*TINY_VIT_OVERRIDES, f"data.options={{root: {images}}}", "scenario.num_tasks=2",
            "scenario.order=natural", "train.epochs=1", "train.amp=false"]
    args = ["run", "clinc150", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]
    monkeypatch.setenv(faults.FAULT_ENV, "train:task=1:epoch=0:step=0:raise")
    with pytest.raises(faults.InjectedFault):
        main([*args, "--set", "train.device=cuda"])
    assert (out / "checkpoints" / "latest").exists() and not (out / "results.json").exists()
    monkeypatch.delenv(faults.FAULT_ENV)
    assert main([*args, "--set", "train.device=cpu", "--resume"]) == 0  # the GPU checkpoint loads on the CPU
    results = json.loads((out / "results.json").read_text())
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    assert "resumed from" in (out / "run.log").read_text()

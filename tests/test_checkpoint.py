"""Checkpoints and resume: kills at chosen points, resumed runs equal uninterrupted ones; corrupt checkpoints,
other configs, unwritable or full output folders and diverging losses are reported clearly."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image_folder
from inflora import checkpoint as ckpt
from inflora import faults
from inflora.cli import main
from inflora.config import load_config

TINY_VIT = "{img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}"
RESULT_KEYS = ("accuracy_matrix", "task_il_matrix", "task_id_matrix", "final_accuracy", "average_accuracy",
               "forgetting", "accuracy_after_task", "class_order", "test_counts")


def run_args(images: Path, *extra: str) -> list[str]:
    """``inflora run`` arguments of a tiny 3-task image run (random tiny ViT, classifier alignment on)."""
    sets = [
        "data.name=image-folder", f"data.options={{root: {images}}}", "model.backbone=timm:vit_tiny_patch16_224",
        "model.pretrained=false", f"model.options={TINY_VIT}", "scenario.num_tasks=3", "train.batch_size=8",
        "train.epochs=2", "train.eval_batch_size=16", "train.lr=0.01", "inflora.rank=4", "classifier=aligned",
        "aligned.samples_per_class=32", "aligned.epochs=2",
        "train.device=cpu",  # bit-identical resumes are a CPU guarantee (CUDA kernels may be nondeterministic)
        # float64 batch products: float32 ones round differently when a batch is sharded over processes, and on
        # this tiny random model the 2-process memory then differed from the 1-process one (test_distributed)
        "inflora.stats_products=float64",
        *extra,
    ]
    return ["run", *(a for s in sets for a in ("--set", s)), "--quiet"]


def results_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def same_results(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in RESULT_KEYS:
        assert a[key] == b[key], key
    assert [d["memory_dims"] for d in a["diagnostics"]] == [d["memory_dims"] for d in b["diagnostics"]]


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    """The tensors of the run's last checkpoint: heads, adapter, class statistics, RNG states."""
    return load_file(out / "checkpoints" / latest(out) / "tensors.safetensors")


def same_state(out: Path, reference: Path) -> None:
    """Bit-identical final model, memory, class statistics and RNG states."""
    mine, theirs = final_tensors(out), final_tensors(reference)
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


def resumed_and_reference(tmp_path: Path, monkeypatch: Any, sets: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``sets`` uninterrupted and again stopped in task 2 then resumed; assert equal results and learner state;
    return both results."""
    from inflora import faults
    from inflora.cli import main

    args = ["run", *(a for s in sets for a in ("--set", s)), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "reference")]) == 0
    monkeypatch.setenv(faults.FAULT_ENV, "train:task=2:epoch=0:step=1:raise")
    with pytest.raises(faults.InjectedFault):
        main([*args, "--out", str(tmp_path / "run")])
    monkeypatch.delenv(faults.FAULT_ENV)
    assert main([*args, "--out", str(tmp_path / "run"), "--resume"]) == 0
    resumed, reference = results_of(tmp_path / "run"), results_of(tmp_path / "reference")
    assert all(resumed[k] == reference[k] for k in RESULT_KEYS)
    same_state(tmp_path / "run", tmp_path / "reference")
    return resumed, reference


def run_killed(args: list[str], fault: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a subprocess that ends abruptly (os._exit) at ``fault``."""
    env = {**os.environ, faults.FAULT_ENV: fault, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "inflora", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


Reference = namedtuple("Reference", "images out results")


def single_thread() -> Iterator[None]:
    """Tiny models: one thread is fastest, and spares a busy 2-core machine (subprocesses get OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """An uninterrupted one-process run (images and run folder)."""
    base = tmp_path_factory.mktemp("reference")
    images = make_image_folder(base / "images", classes=9, train=11, test=4, size=40)  # 3 tasks x 33 images:
    # batches of 8 end in a batch of one (an empty share for a second process)
    out = base / "run"
    assert main([*run_args(images), "--out", str(out)]) == 0
    return Reference(images, out, results_of(out))


one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
reference = pytest.fixture(scope="module", name="reference")(reference_run)


def copy_run(reference: Reference, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference.out, out)
    return out


# ------------------------------------------------------------------------------------------------ layout
def test_checkpoints_layout_and_pruning(reference: Reference) -> None:
    root = reference.out / "checkpoints"
    assert latest(reference.out) == "task_003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "task_002", "task_003"]  # the last KEEP=2 kept
    meta = json.loads((root / "task_003" / "state.json").read_text())
    assert meta["tasks_done"] == 3 and meta["method"] == "inflora"
    assert meta["run_state"]["accuracy"] == reference.results["accuracy_matrix"]
    tensors = load_file(root / "task_003" / "tensors.safetensors")
    # the learner's state_dict(), saved whole, and the feature-drift references of the three tasks
    assert {k.split(".")[0] for k in tensors} == {"learner", "probe", "rng"}
    assert tensors["learner.classifier.head_sizes"].tolist() == [3, 3, 3]
    assert "learner.adapter.meta" in tensors and "learner.classifier.class_stats.class5.outer" in tensors
    assert "learner.meter.site0.factor2" in tensors  # the energy meter's factor of task 3's statistics
    assert sorted(k for k in tensors if k.startswith("probe.")) == ["probe.task0", "probe.task1", "probe.task2"]


def test_resume_of_a_finished_run_changes_nothing(reference: Reference, tmp_path: Path) -> None:
    out = copy_run(reference, tmp_path)
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) == 0
    same_results(results_of(out), reference.results)


# ------------------------------------------------------------------------------------------------ faults
def test_fault_spec_matching(monkeypatch: pytest.MonkeyPatch) -> None:
    assert faults.fault("train", task=1, step=3) is None
    monkeypatch.setenv(faults.FAULT_ENV, "train:task=1:step=3:nan,stats:task=0:raise")
    assert faults.fault("train", task=1, epoch=0, step=3) == "nan"
    assert faults.fault("train", task=1, epoch=0, step=2) is None
    assert faults.fault("checkpoint", task=1) is None
    with pytest.raises(faults.InjectedFault):
        faults.fault("stats", task=0, phase="memory", batch=0)
    monkeypatch.setenv(faults.FAULT_ENV, "train:rank=1:raise")
    assert faults.fault("train", task=0) is None  # a single process is rank 0


def test_resume_after_fault_in_training_in_process(reference: Reference, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv(faults.FAULT_ENV, "train:task=2:epoch=1:step=0:raise")
    with pytest.raises(faults.InjectedFault):
        main([*run_args(reference.images), "--out", str(out)])
    assert latest(out) == "task_002" and not (out / "results.json").exists()
    monkeypatch.delenv(faults.FAULT_ENV)
    assert main([*run_args(reference.images, "train.progress=true", "train.num_workers=0"), "--out", str(out),
                 "--resume"]) == 0  # cosmetic keys may differ
    same_results(results_of(out), reference.results)
    same_state(out, reference.out)
    assert "resumed from" in (out / "run.log").read_text()


def test_resume_without_checkpoint_starts_from_scratch(reference: Reference, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv(faults.FAULT_ENV, "stats:task=0:phase=design:batch=0:raise")
    with pytest.raises(faults.InjectedFault):
        main([*run_args(reference.images), "--out", str(out)])
    assert not (out / "checkpoints" / "latest").exists()
    monkeypatch.delenv(faults.FAULT_ENV)
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) == 0
    same_results(results_of(out), reference.results)
    assert "no checkpoint" in (out / "run.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("fault, expected_latest", [
    ("train:task=1:epoch=1:step=1", "task_001"),  # killed during training
    ("stats:task=1:phase=memory:batch=0", "task_001"),  # during the statistics pass before the memory update
    ("checkpoint:task=1:stage=tensors", "task_001"),  # during checkpoint writing: half-written temp folder
    ("checkpoint:task=1:stage=folder", "task_001"),  # new folder in place, `latest` not moved yet
])
def test_resume_after_kill(reference: Reference, tmp_path: Path, fault: str, expected_latest: str) -> None:
    out = tmp_path / "run"
    killed = run_killed([*run_args(reference.images), "--out", str(out)], fault, tmp_path)
    assert killed.returncode == faults.FAULT_EXIT_CODE, killed.stderr
    assert latest(out) == expected_latest and not (out / "results.json").exists()
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) == 0
    same_results(results_of(out), reference.results)
    same_state(out, reference.out)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "task_002", "task_003"]  # temp and stale folders pruned


# ------------------------------------------------------------------------------------------------ refusals
def test_resume_with_other_config_is_refused(reference: Reference, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_run(reference, tmp_path)
    config_before = (out / "config.yaml").read_text()
    args = run_args(reference.images, "inflora.rank=3", "train.lr=0.02", "train.progress=true")
    assert main([*args, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "inflora.rank" in err and "train.lr" in err and "train.progress" not in err
    assert (out / "config.yaml").read_text() == config_before


def test_config_differences_ignore_cosmetic_keys() -> None:
    saved = json.loads(json.dumps(ckpt.to_dict(load_config(None, []))))
    other = load_config(None, ["train.progress=false", "train.num_workers=3", "train.device=cpu",
                               "data.data_dir=/elsewhere", "inflora.rank=4", "model.options={a: 1}"])
    assert ckpt.config_differences(saved, other) == ["inflora.rank", "model.options"]
    switched = ckpt.config_differences(saved, load_config(None, ["method=seqlora"]))
    assert "method" in switched and "seqlora.rank" in switched and "inflora.lamb" in switched  # sections too


@pytest.mark.parametrize("damage, message", [
    ("truncate-tensors", r"tensors\.safetensors is corrupt or truncated"),
    ("garble-state", r"state\.json is corrupt or truncated"),
    ("missing-folder", r"task_003.*state\.json cannot be read"),
    ("garble-latest", r"latest is corrupt"),
])
def test_corrupt_checkpoint_is_reported(reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        damage: str, message: str) -> None:
    out = copy_run(reference, tmp_path)
    folder = out / "checkpoints" / "task_003"
    if damage == "truncate-tensors":
        data = (folder / "tensors.safetensors").read_bytes()
        (folder / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garble-state":
        (folder / "state.json").write_text('{"format": 1, "tasks_do')
    elif damage == "missing-folder":
        shutil.rmtree(folder)
    else:
        (out / "checkpoints" / "latest").write_text("../../etc")
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("inflora: error:") and "Traceback" not in err
    assert re.search(message, err), err


# ------------------------------------------------------------------------------------------------ disk, NaN
def test_unwritable_output_folder_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main([*run_args(tmp_path / "no-images"), "--out", str(blocker / "run")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_full_disk_detected_before_training(reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _path: usage._replace(free=4096))
    monkeypatch.setattr("inflora.engine.Experiment.run", lambda self: pytest.fail("training started"))
    assert main([*run_args(reference.images), "--out", str(tmp_path / "run")]) == 2
    assert "MiB free" in capsys.readouterr().err


def test_failed_checkpoint_write_keeps_the_last_one(reference: Reference, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    write = ckpt._write_bytes

    def full_disk(path: Path, data: bytes) -> None:
        if "task_002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", full_disk)
    assert main([*run_args(reference.images), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "No space left on device" in err and "(task_001) is kept" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "task_001"]
    monkeypatch.setattr(ckpt, "_write_bytes", write)
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) == 0
    same_results(results_of(out), reference.results)


def test_diverged_loss_is_reported_and_last_checkpoint_kept(reference: Reference, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv(faults.FAULT_ENV, "train:task=1:epoch=1:step=2:nan")
    assert main([*run_args(reference.images), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at task 1, epoch 1, step 2" in err and "Traceback" not in err
    assert latest(out) == "task_001"


def test_multi_seed_run_resumes_and_summarises(reference: Reference, tmp_path: Path) -> None:
    """A two-seed run killed in the second seed resumes: the first seed is kept (not retrained), the second
    continues from its checkpoint, and summary.json holds the mean and sample std of both seeds' numbers."""
    out = tmp_path / "seeds"
    args = [*run_args(reference.images, "scenario.num_tasks=3", "train.epochs=1"), "--seeds", "0,1", "--out",
            str(out)]
    killed = run_killed(args, "train:seed=1:task=1:epoch=0:step=1", tmp_path)
    assert killed.returncode == faults.FAULT_EXIT_CODE, killed.stderr
    seed0 = results_of(out / "seed_0")
    assert not (out / "seed_1" / "results.json").exists() and latest(out / "seed_1") == "task_001"
    assert main([*args, "--resume"]) == 0
    assert results_of(out / "seed_0") == seed0  # finished seed untouched
    seed1 = results_of(out / "seed_1")
    assert "resumed from" in (out / "seed_1" / "run.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    finals = [seed0["final_accuracy"], seed1["final_accuracy"]]
    mean = sum(finals) / 2
    std = (sum((f - mean) ** 2 for f in finals) / 1) ** 0.5
    assert summary["seeds"] == [0, 1] and summary["final_accuracy"]["values"] == finals
    assert summary["final_accuracy"]["mean"] == pytest.approx(mean) and summary["final_accuracy"]["std"] == \
        pytest.approx(std)

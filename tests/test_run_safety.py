"""Runs never lose or silently corrupt data (issue #9, part A): resume recovers from a missing ``latest``, checks
the configuration and the data, verifies ``state.json``; ``--resume`` / ``--overwrite`` delete only what inflora
wrote and never follow a symlink out of the run folder; a failed start-up writes nothing; Ctrl-C says how to go on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_image_folder
from inflora import faults
from inflora.cli import main
from test_checkpoint import copy_run, latest, reference_run, results_of, run_args, same_results, single_thread

one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
reference = pytest.fixture(scope="module", name="reference")(reference_run)
IMAGES = {"classes": 9, "train": 11, "test": 4, "size": 40}  # the reference run's images


def stop_after_task_1(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.FAULT_ENV, "train:task=2:epoch=0:step=0:raise")
    with pytest.raises(faults.InjectedFault):
        main(args)
    monkeypatch.delenv(faults.FAULT_ENV)


# ------------------------------------------------------------------------------------------------ item 1
def test_resume_without_latest_recovers_newest_complete_checkpoint(reference, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    stop_after_task_1([*run_args(reference.images), "--out", str(out)], monkeypatch)
    root = out / "checkpoints"
    assert latest(out) == "task_002"
    (root / "latest").unlink()
    tensors = root / "task_002" / "tensors.safetensors"  # the newest is damaged: fall back to task_001
    tensors.write_bytes(tensors.read_bytes()[:100])
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) == 0
    log = (out / "run.log").read_text()
    assert "resumed from" in log and "task_001" in log and "recovered" in log
    same_results(results_of(out), reference.results)


def test_resume_without_any_complete_checkpoint_is_refused(reference, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_run(reference, tmp_path)
    (out / "checkpoints" / "latest").unlink()
    for name in ("task_002", "task_003"):
        (out / "checkpoints" / name / "state.json").write_text("{}")
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) != 0
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "Traceback" not in err
    assert (out / "checkpoints" / "task_003" / "tensors.safetensors").exists()  # nothing deleted


def test_finished_run_without_checkpoints_still_checks_config(reference, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = {name: (out / name).read_bytes() for name in ("results.json", "config.yaml")}
    assert main([*run_args(reference.images, "method=seqlora"), "--out", str(out), "--resume"]) == 2
    assert "method" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    monkeypatch.setattr("inflora.engine.Experiment.run", lambda self: pytest.fail("a finished run was retrained"))
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) == 0
    assert (out / "results.json").read_bytes() == before["results.json"]


# ------------------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_foreign_files_in_checkpoints_survive(reference, tmp_path: Path, flag: str) -> None:
    out = copy_run(reference, tmp_path)
    if flag == "--resume":
        (out / "checkpoints" / "latest").unlink()
        shutil.rmtree(out / "checkpoints" / "task_002")
        shutil.rmtree(out / "checkpoints" / "task_003")  # nothing to resume: a fresh start in the same folder
        (out / "results.json").unlink()
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "checkpoints" / "other-tool").mkdir()
    (out / "checkpoints" / "other-tool" / "state.json").write_text("{}")
    assert main([*run_args(reference.images), "--out", str(out), flag]) == 0
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "other-tool" / "state.json").read_text() == "{}"
    same_results(results_of(out), reference.results)


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_symlinked_checkpoints_are_refused(reference, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           flag: str) -> None:
    other = copy_run(reference, tmp_path / "other")
    snapshot = sorted((p.relative_to(other), p.read_bytes()) for p in other.rglob("*") if p.is_file())
    out = copy_run(reference, tmp_path / "mine")
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").symlink_to(other / "checkpoints", target_is_directory=True)
    assert main([*run_args(reference.images), "--out", str(out), flag]) == 2
    err = capsys.readouterr().err
    assert "symlink" in err and "checkpoints" in err
    assert sorted((p.relative_to(other), p.read_bytes()) for p in other.rglob("*") if p.is_file()) == snapshot


# ------------------------------------------------------------------------------------------------ item 4
def test_resume_on_other_data_is_refused_and_moved_data_resumes(reference, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first"
    make_image_folder(first / "images", **IMAGES)
    out = tmp_path / "run"

    def args(data_dir: Path) -> list[str]:
        return [*run_args(Path("images"), f"data.data_dir={data_dir}"), "--out", str(out)]

    stop_after_task_1(args(first), monkeypatch)
    fewer = tmp_path / "fewer"  # other per-task sample counts
    make_image_folder(fewer / "images", **{**IMAGES, "train": 10})
    edited = tmp_path / "edited"  # same names and counts, one file's contents changed
    shutil.copytree(first, edited)
    png = edited / "images" / "test" / "class_4" / "1.png"
    png.write_bytes(png.read_bytes() + b"changed")
    for data_dir, what in ((fewer, "train samples"), (edited, "contents")):
        assert main([*args(data_dir), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "different data" in err and what in err, err
    assert latest(out) == "task_002"
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    assert main([*args(moved), "--resume"]) == 0
    results = results_of(out)
    same_results(results, reference.results)
    fingerprint = results["data_fingerprint"]
    assert fingerprint["class_names"][:3] == reference.results["class_order"][:3]
    assert len(fingerprint["tasks"]) == 3 and fingerprint["tasks"][0]["train"] == 33


# ------------------------------------------------------------------------------------------------ item 5
def test_edited_state_json_is_detected(reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_run(reference, tmp_path)
    state = out / "checkpoints" / "task_003" / "state.json"
    meta = json.loads(state.read_text())
    meta["run_state"]["accuracy"][0][0] += 1.0
    state.write_text(json.dumps(meta, indent=1) + "\n")
    assert main([*run_args(reference.images), "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "state.json" in err and "checksum mismatch" in err and "Traceback" not in err
    assert "task_002" in err and "checkpoints/latest" in err and "--resume" in err


# ------------------------------------------------------------------------------------------------ item 7
def test_overwrite_removes_only_what_inflora_wrote(reference, tmp_path: Path) -> None:
    out = copy_run(reference, tmp_path)
    shutil.copytree(reference.out, out / "seed_5")  # an earlier multi-seed run's folder
    (out / "summary.json").write_text("{}")
    (out / "run.log").write_text("OLD LINE\n")
    (out / "notes.txt").write_text("mine")
    (out / "seed_7").mkdir()
    (out / "seed_7" / "notes.txt").write_text("mine too")
    assert main([*run_args(reference.images), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "summary.json").exists() and not (out / "seed_5").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "seed_7" / "notes.txt").read_text() == "mine too"
    assert "OLD LINE" not in (out / "run.log").read_text()
    same_results(results_of(out), reference.results)


# ------------------------------------------------------------------------------------------------ item 11
@pytest.mark.parametrize("bad", ["data", "backbone"])
def test_failed_start_up_writes_nothing(reference, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        bad: str) -> None:
    out = tmp_path / "run"
    if bad == "data":
        args = run_args(tmp_path / "no-images")
    else:
        args = run_args(reference.images, "model.backbone=timm:no_such_model_at_all")
    assert main([*args, "--out", str(out)]) == 1
    assert "inflora: error:" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert main([*run_args(reference.images), "--out", str(out)]) == 0  # the corrected command is not refused


def test_interrupt_says_how_to_continue(reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import inflora.engine

    train = inflora.engine.train_task

    def interrupted(learner, ctx, *args, **kwargs):
        if ctx.index == 1:
            raise KeyboardInterrupt
        return train(learner, ctx, *args, **kwargs)

    monkeypatch.setattr(inflora.engine, "train_task", interrupted)
    out = tmp_path / "run"
    assert main([*run_args(reference.images), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "task_001" in err and str(out) in err

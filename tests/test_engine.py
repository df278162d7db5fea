"""End-to-end runs: a vision run on generated images with a tiny timm ViT, and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT_OVERRIDES, for_method, make_image_folder
from inflora.cli import main
from inflora.config import load_config
from inflora.engine import Experiment
from inflora.evaluation import evaluate
from inflora.training import MIN_STEPS_TO_JUDGE, learning_stalled


def vision_config(root: Path, *extra: str):
    return load_config("clinc150", for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {root}}}",
                                               "scenario.num_tasks=2", "scenario.order=natural", "train.epochs=2",
                                               "train.lr=0.01", *extra]))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def check_results(results: dict) -> None:
    """results.json is complete and consistent with its own accuracy matrix (metrics recomputed here by hand,
    not with the functions the engine calls)."""
    for key in ("method", "classifier", "benchmark", "seed", "accuracy_matrix", "final_accuracy",
                "average_accuracy", "forgetting", "task_il_accuracy", "timings", "diagnostics", "config"):
        assert key in results, key
    acc, counts = results["accuracy_matrix"], results["test_counts"]
    n = results["num_tasks"]
    assert [len(r) for r in acc] == list(range(1, n + 1))
    assert all(0.0 <= a <= 100.0 for row in acc for a in row)
    after = [sum(a * c for a, c in zip(row, counts, strict=False)) / sum(counts[: len(row)]) for row in acc]
    assert results["accuracy_after_task"] == pytest.approx(after)
    assert results["final_accuracy"] == pytest.approx(after[-1])
    assert results["average_accuracy"] == pytest.approx(sum(after) / n)
    if n > 1:
        forgetting = sum(max(acc[i][j] for i in range(j, n - 1)) - acc[-1][j] for j in range(n - 1)) / (n - 1)
        assert results["forgetting"] == pytest.approx(forgetting)
    assert len(results["timings"]) == n and len(results["diagnostics"]) == n
    for t in results["timings"]:
        assert t["train_s"] > 0 and t["eval_s"] > 0


def test_vision_run_end_to_end(images: Path) -> None:
    results = Experiment(vision_config(images)).run()
    check_results(results)
    dims = results["diagnostics"][-1]["memory_dims"]
    assert dims and all(mode in ("basis", "complement") for mode, _ in dims.values())
    assert results["diagnostics"][0]["stats_s"] > 0 and results["diagnostics"][0]["design_s"] > 0
    assert results["task_il_accuracy"] >= 90.0  # 2 classes per task: coloured classes are learnable (measured 100)


def test_training_loss_at_the_start_and_end_of_each_task_is_recorded(images: Path) -> None:
    """``train_loss_start``/``train_loss_end``: the mean loss over the first / last tenth of a task's steps, checked
    against every step's loss as a step logger sees it; a learner that trains nothing records neither."""
    experiment = Experiment(vision_config(images, "train.epochs=3"))
    seen: dict[int, list[float]] = {}
    experiment.step_loggers.append(lambda record: seen.setdefault(record.task, []).append(record.loss))
    results = experiment.run()
    for task, d in enumerate(results["diagnostics"]):
        losses = seen[task]
        tenth = max(1, len(losses) // 10)
        assert d["train_loss_start"] == pytest.approx(sum(losses[:tenth]) / tenth)
        assert d["train_loss_end"] == pytest.approx(sum(losses[-tenth:]) / tenth)
    frozen = Experiment(vision_config(images, "method=frozen", "classifier=prototype")).run()
    assert not any("train_loss_end" in d for d in frozen["diagnostics"])


def test_a_task_that_does_not_learn_is_flagged(images: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert learning_stalled(5.70, 5.17, 150) and not learning_stalled(3.97, 0.68, 150)  # CoLoR's two tasks
    assert not learning_stalled(9.0, 5.0, 150) and not learning_stalled(1.0, 1.0, 1)  # it fell; one class
    frozen = ("method=frozen", "classifier=linear", f"train.epochs={MIN_STEPS_TO_JUDGE}")
    with caplog.at_level("WARNING", logger="inflora"):
        Experiment(vision_config(images, *frozen, "train.lr=1e-12", "train.head_lr=1e-12")).run()  # nothing moves
    assert [r.message.split(":")[0] for r in caplog.records] == ["task 1 did not learn", "task 2 did not learn"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="inflora"):
        results = Experiment(vision_config(images, *frozen)).run()  # the heads learn
    assert all(d["train_loss_end"] < 0.7 * d["train_loss_start"] for d in results["diagnostics"])
    assert not any("did not learn" in r.message for r in caplog.records)


def test_seeded_run_repeats_exactly(images: Path) -> None:
    a = Experiment(vision_config(images, "classifier=aligned", "aligned.epochs=1")).run()
    b = Experiment(vision_config(images, "classifier=aligned", "aligned.epochs=1")).run()
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert [d["memory_dims"] for d in a["diagnostics"]] == [d["memory_dims"] for d in b["diagnostics"]]


@pytest.mark.parametrize("method", ["seqlora", "joint", "frozen"])
def test_every_learner_runs(images: Path, method: str) -> None:
    results = Experiment(vision_config(images, f"method={method}", "train.epochs=1")).run()
    check_results(results)
    if method == "frozen":
        assert all("stats_s" not in d and d.get("method_s", 0.0) == 0 for d in results["diagnostics"])


def test_cli_run_writes_results_config_and_log(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--quiet", "--seeds", "0,1"]
    for o in [*TINY_VIT_OVERRIDES, f"data.options={{root: {images}}}", "scenario.num_tasks=2", "train.epochs=1"]:
        args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "final accuracy" in printed and "+-" in printed
    for seed in (0, 1):
        results = json.loads((out / f"seed_{seed}" / "results.json").read_text())
        check_results(results)
        assert results["seed"] == seed
        assert (out / f"seed_{seed}" / "config.yaml").is_file() and (out / f"seed_{seed}" / "run.log").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["final_accuracy"]) == {"mean", "std", "values"}
    assert main(args) == 2  # the folder is not empty: refuse without --resume/--overwrite
    assert "not empty" in capsys.readouterr().err


def test_cli_reports_bad_input_clearly(tmp_path: Path, capsys) -> None:
    assert main(["run", "nope-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["run", "--set", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "train.epochs" in err
    assert main(["run", "--set", "method=bogus"]) == 2
    assert "inflora" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "missing"), "--quiet"]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_presets_command_lists_every_preset(capsys) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("clinc150", "banking77", "cifar100-10", "imagenet-r-5", "imagenet-r-10", "imagenet-r-20",
                 "domainnet-5", "cifar100-10-b5"):
        assert name in out


def test_one_pass_evaluation_equals_task_by_task(images: Path) -> None:
    """evaluate() scores every seen task in one length-ordered pass; recount each task on its own by hand."""
    experiment = Experiment(vision_config(images, "scenario.num_tasks=2"))
    experiment.run()
    upto = experiment.num_tasks - 1
    data, learner = experiment.data, experiment.learner
    row, til, tid, routing = evaluate(learner, data, experiment.layout, upto)
    assert routing is None  # the linear learner routes nothing
    sizes = [len(t.classes) for t in experiment.scenario.tasks]
    for j in range(upto + 1):
        dataset = data.split(data.eval_split, data.eval_indices(j), train_transforms=False)
        parts = []
        with torch.no_grad():
            for inputs, labels in data.loader(dataset, 4):
                parts.append((learner.predict(inputs, upto), labels))
        logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        lo, hi = sum(sizes[:j]), sum(sizes[: j + 1])
        assert row[j] == pytest.approx(100.0 * float((logits.argmax(-1) == labels).double().mean()))
        assert til[j] == pytest.approx(100.0 * float((logits[:, lo:hi].argmax(-1) + lo == labels).double().mean()))
        in_task = (logits.argmax(-1) >= lo) & (logits.argmax(-1) < hi)
        assert tid[j] == pytest.approx(100.0 * float(in_task.double().mean()))

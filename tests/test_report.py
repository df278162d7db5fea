"""Reports (issue #12): aggregation over seeds equals mean/std computed here from the matrices, the tables, figures
and a self-contained report.html, ``inflora report`` on a run folder, and TensorBoard logging of a run."""

from __future__ import annotations

import base64
import csv
import json
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import TINY_VIT_OVERRIDES, make_image_folder
from inflora.checkpoint import config_differences
from inflora.cli import main
from inflora.config import ConfigError, load_config, to_dict
from inflora.metrics import forgetting_per_task
from inflora.report import ReportError, aggregate, collect, memory_dimensions, summarize_group, write_report
from inflora.report.tables import csv_text, markdown
from inflora.runfolder import FIGURES, REPORT_FILES
from inflora.tblog import require_tensorboard


# ------------------------------------------------------------------------------------------------ fake results
def fake_results(seed: int, num_tasks: int = 4, method: str = "m") -> dict[str, Any]:
    """A finished run's results.json with random matrices, counts, timings and per-task diagnostics."""
    rng = np.random.default_rng(seed + 100 * len(method))
    rows = lambda: [[float(x) for x in rng.uniform(20, 100, i + 1).round(2)] for i in range(num_tasks)]  # noqa: E731
    acc = rows()
    return {
        "method": method, "classifier": "linear", "benchmark": "fake", "seed": seed, "eval_split": "test",
        "num_tasks": num_tasks, "tasks_done": num_tasks,
        "test_counts": [int(c) for c in rng.integers(5, 50, num_tasks)],
        "accuracy_matrix": acc, "task_il_matrix": rows(), "task_id_matrix": rows(),
        "accuracy_after_task": [float(np.mean(r)) for r in acc],  # as saved; the report recomputes A_t itself
        "timings": [{p: float(rng.uniform(0.1, 2)) for p in ("begin_s", "train_s", "end_s", "eval_s")}
                    for _ in range(num_tasks)],
        "diagnostics": [{"trainable_parameters": int(rng.integers(100, 1000)),
                         "memory_spans": {"blocks.10.qkv": 3 * t + seed, "blocks.2.qkv": 2 * t}}
                        for t in range(num_tasks)],
        "config": {"method": method, "seed": seed, "train": {"lr": 0.01}},
    }


def expected(run: dict[str, Any]) -> dict[str, float]:
    """The table's figures of one run, computed here from the definitions."""
    acc, n = run["accuracy_matrix"], np.asarray(run["test_counts"], dtype=float)
    t = len(acc)
    a_t = [float(np.dot(acc[i], n[: i + 1]) / n[: i + 1].sum()) for i in range(t)]
    return {
        "final_accuracy": a_t[-1], "average_accuracy": float(np.mean(a_t)),
        "forgetting": float(np.mean([max(acc[i][j] for i in range(j, t - 1)) - acc[-1][j] for j in range(t - 1)])),
        "backward_transfer": float(np.mean([acc[-1][j] - acc[j][j] for j in range(t - 1)])),
        "task_il_accuracy": float(np.dot(run["task_il_matrix"][-1], n) / n.sum()),
        "task_id_accuracy": float(np.dot(run["task_id_matrix"][-1], n) / n.sum()),
        "wall_s": sum(sum(x.values()) for x in run["timings"]),
        "train_s": sum(x["train_s"] for x in run["timings"]),
        "trainable_parameters": float(np.mean([d["trainable_parameters"] for d in run["diagnostics"]])),
    }


def test_aggregation_is_mean_and_sample_std_over_seeds() -> None:
    runs = [fake_results(s) for s in (2, 0, 1)]
    group = summarize_group("m", runs)
    assert group["seeds"] == [0, 1, 2]
    per_seed = [expected(r) for r in sorted(runs, key=lambda r: r["seed"])]
    for key in per_seed[0]:
        values = [e[key] for e in per_seed]
        figure = group["metrics"][key]
        assert figure["values"] == pytest.approx(values), key
        assert figure["mean"] == pytest.approx(sum(values) / 3), key
        assert figure["std"] == pytest.approx(np.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)), key
    curves = np.array([[np.dot(r["accuracy_matrix"][i], r["test_counts"][: i + 1]) / sum(r["test_counts"][: i + 1])
                        for i in range(4)] for r in runs])
    assert group["accuracy_after_task"]["mean"] == pytest.approx(curves.mean(0).tolist())
    assert group["accuracy_after_task"]["std"] == pytest.approx(curves.std(0, ddof=1).tolist())
    assert group["accuracy_matrix"][3] == pytest.approx(np.mean([r["accuracy_matrix"][3] for r in runs], 0).tolist())
    drops = np.array([[max(r["accuracy_matrix"][i][j] for i in range(j, 3)) - r["accuracy_matrix"][3][j]
                       for j in range(3)] for r in runs])
    assert group["forgetting_per_task"]["mean"] == pytest.approx(drops.mean(0).tolist())
    assert group["time_per_task"]["eval_s"] == pytest.approx(
        np.mean([[x["eval_s"] for x in r["timings"]] for r in runs], 0).tolist())
    # layers in natural order, the mean dimension over seeds after every task
    assert list(group["memory_dimensions"]) == ["blocks.2.qkv", "blocks.10.qkv"]
    assert group["memory_dimensions"]["blocks.10.qkv"] == pytest.approx([3 * t + 1.0 for t in range(4)])
    single = summarize_group("one", [runs[0]])
    assert single["metrics"]["final_accuracy"]["std"] == 0.0


def test_routing_accuracy_is_reported_only_for_learners_that_route() -> None:
    plain = [fake_results(s) for s in (0, 1)]
    routed = [fake_results(s, method="r") for s in (0, 1)]
    routed[0]["diagnostics"][-1]["routing_matrix"] = [[9, 1, 0, 0], [0, 10, 0, 0], [2, 0, 8, 0], [0, 0, 0, 10]]
    routed[1]["diagnostics"][-1]["routing_matrix"] = [[10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 0], [0, 0, 0, 10]]
    comparison = aggregate({"plain": plain, "routed": routed})
    assert "routing_accuracy" not in comparison["methods"][0]["metrics"]
    figure = comparison["methods"][1]["metrics"]["routing_accuracy"]
    assert figure["values"] == pytest.approx([100.0 * 37 / 40, 100.0])
    text = markdown(comparison)
    assert "Routing accuracy after the last task" in text and "routed 96.25 ± 5.30" in text and "plain 9" not in text
    assert csv_text(comparison).splitlines()[0].endswith("routing_accuracy_mean,routing_accuracy_std")
    del routed[0]["diagnostics"][-1]["routing_matrix"]  # a run from before the routing counts
    assert "routed 100.00 ± 0.00 (1 of 2 seeds)" in markdown(aggregate({"routed": routed}))


def test_forgetting_per_task_and_memory_from_either_diagnostic() -> None:
    acc = [[80.0], [60.0, 90.0], [70.0, 50.0, 40.0]]
    assert forgetting_per_task(acc) == [80.0 - 70.0, 90.0 - 50.0]
    assert forgetting_per_task([[50.0]]) == []
    spans = {"diagnostics": [{"memory_spans": {"a": 4}}, {"memory_spans": {"a": 9}}]}
    assert memory_dimensions(spans) == {"a": [4.0, 9.0]}
    # without spans: the stored columns are the dimension in basis mode only (complement mode stores the rest)
    dims = {"diagnostics": [{"memory_dims": {"a": ["basis", 4]}}, {"memory_dims": {"a": ["complement", 3]}}]}
    assert memory_dimensions(dims) == {"a": [4.0, None]}
    assert memory_dimensions({"diagnostics": [{"trainable_parameters": 5}]}) is None


def test_unreportable_runs_are_refused() -> None:
    with pytest.raises(ReportError, match="different numbers of tasks"):
        summarize_group("m", [fake_results(0, 3), fake_results(1, 4)])
    with pytest.raises(ReportError, match="given twice"):
        summarize_group("m", [fake_results(0), fake_results(0)])
    with pytest.raises(ReportError, match="no finished run"):
        aggregate({"m": []})


class Page(HTMLParser):
    """The parts of report.html the tests read: embedded images, table cells, other references."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []
        self.links: list[str] = []
        self._cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"] or "")
        self.links += [v for k, v in attrs if k in ("href", "src") and v and not v.startswith("data:")]
        self._cell = tag == "td"

    def handle_data(self, data: str) -> None:
        if self._cell:
            self.cells.append(data)
            self._cell = False


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def embedded_pngs(page: Page) -> list[bytes]:
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in page.images)
    return [base64.b64decode(src[len(prefix):]) for src in page.images]


def test_report_writes_tables_figures_and_a_self_contained_page(tmp_path: Path) -> None:
    groups = {"alpha": [fake_results(s, method="alpha") for s in (0, 1)], "beta": [fake_results(0, method="beta")]}
    paths = write_report(groups, {"beta": [1]}, tmp_path, "fake comparison")
    names = {p.name for p in paths}
    assert set(REPORT_FILES) <= names
    pngs = sorted((tmp_path / FIGURES).glob("*.png"))
    assert {p.name for p in pngs} == {"accuracy_curves.png", "final_accuracy.png", "forgetting_per_task.png",
                                      "time_per_task.png", "heatmap-alpha.png", "heatmap-beta.png",
                                      "memory-alpha.png", "memory-beta.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = read_page(tmp_path / "report.html")
    assert not page.links  # nothing outside the page
    assert sorted(embedded_pngs(page)) == sorted(p.read_bytes() for p in pngs)
    alpha = [expected(r) for r in groups["alpha"]]
    mean = np.mean([e["final_accuracy"] for e in alpha])
    assert f"{mean:.2f} ± {np.std([e['final_accuracy'] for e in alpha], ddof=1):.2f}" in page.cells
    assert "0 (missing 1)" in page.cells
    with open(tmp_path / "comparison.csv", newline="") as fh:
        rows = {r["label"]: r for r in csv.DictReader(fh)}
    assert float(rows["alpha"]["final_accuracy_mean"]) == pytest.approx(mean)
    assert float(rows["beta"]["forgetting_std"]) == 0.0
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [m["label"] for m in saved["methods"]] == ["alpha", "beta"] and saved["missing"] == {"beta": [1]}
    assert "| alpha | 0,1 |" in (tmp_path / "comparison.md").read_text()
    # a redraw without beta removes beta's figures, and nothing else of the folder
    (tmp_path / FIGURES / "notes.png").write_bytes(b"mine")
    write_report({"alpha": groups["alpha"]}, {}, tmp_path, "again")
    assert not (tmp_path / FIGURES / "heatmap-beta.png").exists() and (tmp_path / FIGURES / "notes.png").exists()


# ------------------------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def run_args(images: Path, *extra: str) -> list[str]:
    sets = [*TINY_VIT_OVERRIDES, f"data.options={{root: {images}}}", "scenario.num_tasks=2", "train.epochs=2",
            "train.lr=0.01", "classifier=linear", "train.device=cpu", *extra]
    return ["run", *(a for s in sets for a in ("--set", s)), "--quiet"]


def test_report_of_a_run_folder_and_tensorboard_logging(images: Path, tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    out = tmp_path / "run"
    assert main([*run_args(images, "logging.tensorboard=true"), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    board = accumulator.EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"loss/task_001", "loss/task_002", "metrics/A_t", "metrics/forgetting", "accuracy_on/task_002",
            "time/train_s", "diagnostics/trainable_parameters"} <= tags
    steps = [e.step for e in board.Scalars("loss/task_001")]
    assert steps == list(range(4))  # 8 training images, batches of 8, 2 epochs: steps 0..3 of the task
    assert all(np.isfinite(e.value) for e in board.Scalars("loss/task_002"))
    a_t = board.Scalars("metrics/A_t")
    assert [e.step for e in a_t] == [1, 2]
    assert [e.value for e in a_t] == pytest.approx(results["accuracy_after_task"], abs=1e-4)
    assert [e.value for e in board.Scalars("accuracy_on/task_001")] == pytest.approx(
        [row[0] for row in results["accuracy_matrix"]], abs=1e-4)

    assert main(["report", str(out)]) == 0
    title, groups, missing = collect(out)
    assert title == "Run run"
    assert list(groups) == ["run"] and not missing
    table = json.loads((out / "comparison.json").read_text())
    assert table["methods"][0]["metrics"]["final_accuracy"]["mean"] == pytest.approx(results["final_accuracy"])
    assert (out / FIGURES / "memory-run.png").is_file()  # InfLoRA saved its memory dimensions
    assert len(embedded_pngs(read_page(out / "report.html"))) == len(list((out / FIGURES).glob("*.png")))
    # the same run again over it: --overwrite removes the old report and event files, and nothing else
    (out / FIGURES / "mine.txt").write_text("mine")
    assert main([*run_args(images), "--out", str(out), "--overwrite"]) == 0
    assert not any((out / name).exists() for name in REPORT_FILES)
    assert not (out / "tensorboard").exists() and [p.name for p in (out / FIGURES).iterdir()] == ["mine.txt"]


def test_tensorboard_is_cosmetic_and_its_absence_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = load_config(None)
    logged = load_config(None, ["logging.tensorboard=true"])
    assert logged.logging.tensorboard and config_differences(to_dict(plain), logged) == []  # resumable either way
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        require_tensorboard()


def test_report_of_a_folder_without_results_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 1
    assert "holds no results.json" in capsys.readouterr().err


def test_mixed_precisions_are_flagged_in_the_table() -> None:
    from inflora.report.tables import markdown
    same = [fake_results(s) | {"precision": "float32"} for s in (0, 1)]
    other = [fake_results(s, method="b") | {"precision": "bfloat16 autocast"} for s in (0, 1)]
    assert summarize_group("m", same)["precision"] == ["float32"]
    assert "different precisions" not in markdown(aggregate({"m": same, "b": [dict(r, precision="float32")
                                                                               for r in other]}))
    text = markdown(aggregate({"m": same, "b": other}))
    assert "different precisions" in text and "b: bfloat16 autocast" in text and "m: float32" in text
    from inflora.report.html import render
    assert "different precisions" in render(aggregate({"m": same, "b": other}), [], "t")
    # runs from before precision was recorded: derived from device and train.amp, as the runtime decides it
    old_cpu = fake_results(1) | {"device": "cpu", "config": {"train": {"amp": True}}}
    assert summarize_group("x", [same[0], old_cpu])["precision"] == ["float32"]
    old_gpu = fake_results(2) | {"device": "cuda:0", "config": {"train": {"amp": True}}}
    assert summarize_group("y", [old_gpu])["precision"] == ["bfloat16 autocast"]
    assert summarize_group("z", [fake_results(3)])["precision"] == ["unrecorded"]  # neither device nor amp saved

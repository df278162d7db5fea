"""``inflora compare`` (issue #12): the ``--methods`` syntax, option sections per variant, and a comparison of two
tiny methods over two seeds run as subprocesses: a crashed job leaves the others and a partial report, the next call
skips finished runs and resumes the half-done ones from their checkpoints, a changed config is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TINY_VIT_OVERRIDES, make_image_folder
from inflora import faults
from inflora.cli import main
from inflora.config import ConfigError
from inflora.report import Variant, collect, parse_methods, parse_spec, resolve, threads_per_job
from inflora.report.variants import check_sections_used, variant_overrides
from test_report import embedded_pngs, read_page

SRC = Path(__file__).resolve().parents[1] / "src"


# ------------------------------------------------------------------------------------------------ --methods
def test_method_specs_and_labels() -> None:
    assert parse_spec("inflora") == Variant("inflora", "inflora", ())
    assert parse_spec("inflora[classifier=aligned, aligned.epochs=5]") == Variant(
        "inflora_classifier=aligned_aligned.epochs=5", "inflora", ("classifier=aligned", "aligned.epochs=5"))
    assert parse_spec("ca = inflora[classifier=aligned]").label == "ca"
    variants = parse_methods("inflora,seqlora[seqlora.rank=4,train.milestones=[1, 2]],f=frozen")
    assert [v.label for v in variants] == ["inflora", "seqlora_seqlora.rank=4_train.milestones=-1-2", "f"]
    assert variants[1].overrides == ("seqlora.rank=4", "train.milestones=[1, 2]")
    assert variants[1].all_overrides()[0] == "method=seqlora"
    for bad, message in [("inflora,inflora", "given twice"), ("inflora[rank]", "key=value"),
                         ("inflora[method=seqlora]", "before the brackets"), ("inflora[a=[1]", "unbalanced"),
                         ("logs=frozen", "cannot name a folder"), ("a b=frozen", "cannot name a folder"),
                         ("", "names no method")]:
        with pytest.raises(ConfigError, match=message):
            parse_methods(bad)


def test_methods_from_a_yaml_file(tmp_path: Path) -> None:
    grid = tmp_path / "methods.yaml"
    grid.write_text("inflora: {}\nca: {method: inflora, classifier: aligned, aligned.epochs: 5}\nseqlora:\n")
    assert parse_methods(str(grid)) == [Variant("inflora", "inflora"),
                                        Variant("ca", "inflora", ("classifier=\"aligned\"", "aligned.epochs=5")),
                                        Variant("seqlora", "seqlora")]
    config = resolve(None, parse_methods(str(grid))[1], [])
    assert config.classifier == "aligned" and config.classifier_options.epochs == 5
    grid.write_text("- inflora\n- lin=frozen[classifier=linear]\n")
    assert [v.label for v in parse_methods(str(grid))] == ["inflora", "lin"]
    grid.write_text("just text\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_methods(str(grid))


GRIDS = Path(__file__).resolve().parents[1] / "benchmarks" / "grids"
COMPARE_GRIDS = {  # the committed `inflora compare --methods` files: preset, common overrides, number of variants
    "clinc150-chosen.yaml": ("clinc150", [], 17),
    "clinc150-ciphers-chosen.yaml": ("clinc150-ciphers", [], 14),
    "clinc150-ciphers-val-rest.yaml": ("clinc150-ciphers", ["scenario.eval_split=val",
                                                            "scenario.domains=[plain,cipher-1,cipher-2]",
                                                            "scenario.max_train_per_class=30"], 6),
    "clinc150-ciphers-val-adapters.yaml": ("clinc150-ciphers", ["scenario.eval_split=val",
                                                                "scenario.domains=[plain,cipher-1,cipher-2]",
                                                                "scenario.max_train_per_class=30"], 24),
    "clinc150-ciphers-val-colora.yaml": ("clinc150-ciphers", ["scenario.eval_split=val",
                                                              "scenario.domains=[plain,cipher-1,cipher-2]",
                                                              "scenario.max_train_per_class=30"], 2),
    "clinc150-cipher-chosen.yaml": ("clinc150-cipher", [], 16),
    "clinc150-cipher-val-rest.yaml": ("clinc150-cipher", ["scenario.eval_split=val", "scenario.num_tasks=3",
                                                          "scenario.classes_per_task=15"], 30),
}


@pytest.mark.parametrize("name", sorted(COMPARE_GRIDS))
def test_committed_grids_resolve(name: str) -> None:
    """Every variant of the grids the docs' tables come from resolves on its preset (labels, keys, option sections)."""
    preset, common, count = COMPARE_GRIDS[name]
    variants = parse_methods(str(GRIDS / name))
    assert len(variants) == count
    check_sections_used(preset, variants, common)
    for variant in variants:
        resolve(preset, variant, common, seed=0)


def test_cipher_grid_pins_the_one_epoch_runs_of_its_table() -> None:
    """joint and seqlora were chosen with one epoch, before the preset moved to 3: the grid must not inherit 3."""
    variants = {v.label: v for v in parse_methods(str(GRIDS / "clinc150-cipher-chosen.yaml"))}
    for label in ("joint", "seqlora"):
        config = resolve("clinc150-cipher", variants[label], [], seed=0)
        assert (config.train.epochs, config.train.lr) == (1, 1e-3)
    assert resolve("clinc150-cipher", variants["inflora"], [], seed=0).train.epochs == 3


def test_ciphers_adapter_grids_vary_only_the_head() -> None:
    """On clinc150-ciphers the 8 adapters keep 1 epoch and their clinc150-cipher lr; validation varies the head
    (3 variants each), the chosen grid holds the ridge head that won for every one."""
    lr = {"sdlora": 1e-3, "olora": 1e-3, "clora": 5e-3, "lae": 5e-3, "colora": 5e-3, "l2p": 5e-3, "dualprompt": 5e-3,
          "codaprompt": 5e-3}
    heads: dict[str, list[str]] = {}
    for variant in parse_methods(str(GRIDS / "clinc150-ciphers-val-adapters.yaml")):
        config = resolve("clinc150-ciphers", variant, [], seed=0)
        assert (config.train.epochs, config.train.lr) == (1, lr[config.method]), variant.label
        heads.setdefault(config.method, []).append(f"{config.classifier} {config.classifier_options.epochs}"
                                                    if config.classifier == "aligned" else config.classifier)
    assert heads == {m: ["aligned 10", "aligned 20", "ridge"] for m in lr}
    chosen_grid = parse_methods(str(GRIDS / "clinc150-ciphers-chosen.yaml"))
    chosen = [resolve("clinc150-ciphers", v, [], seed=0) for v in chosen_grid]
    adapters = [c for c in chosen if c.method in lr]
    assert sorted(c.method for c in adapters) == sorted(lr)
    chosen_lr = {**lr, "colora": 1e-3}  # CoLoR's rate was chosen again over 3 validation seeds (val-colora grid)
    assert all((c.classifier, c.train.epochs, c.train.lr) == ("ridge", 1, chosen_lr[c.method]) for c in adapters)


def test_ciphers_colora_grid_varies_only_the_learning_rate() -> None:
    """CoLoR's 3-seed validation grid: the one-seed choice (5e-3, as in the adapters grid) against 1e-3, ridge head."""
    configs = [resolve("clinc150-ciphers", v, [], seed=0)
               for v in parse_methods(str(GRIDS / "clinc150-ciphers-val-colora.yaml"))]
    assert [(c.method, c.classifier, c.train.epochs, c.train.lr) for c in configs] == [
        ("colora", "ridge", 1, 5e-3), ("colora", "ridge", 1, 1e-3)]
    adapters = {v.label: v for v in parse_methods(str(GRIDS / "clinc150-ciphers-val-adapters.yaml"))}
    assert resolve("clinc150-ciphers", adapters["colora-ridge"], [], seed=0) == configs[0]


def test_option_sections_go_to_the_variants_that_own_them() -> None:
    variants = parse_methods("inflora,seqlora,frozen[classifier=aligned]")
    common = ["inflora.rank=3", "aligned.epochs=2", "train.epochs=4"]
    check_sections_used(None, variants, common)
    configs = [resolve(None, v, common, seed=7) for v in variants]
    assert [c.method for c in configs] == ["inflora", "seqlora", "frozen"]
    assert configs[0].method_options.rank == 3 and configs[1].method_options.rank != 3
    assert all(c.train.epochs == 4 and c.seed == 7 for c in configs)
    assert configs[2].classifier_options.epochs == 2
    assert "inflora.rank=3" not in variant_overrides(None, variants[1], common)
    # the preset chooses classifier aligned: every variant owns "aligned" unless it sets another classifier
    assert "aligned.epochs=2" in variant_overrides(None, variants[0], common)
    with pytest.raises(ConfigError, match="no compared method or classifier"):
        check_sections_used(None, parse_methods("frozen[classifier=linear]"), ["inflora.rank=3"])
    with pytest.raises(ConfigError, match="method 'bogus'"):
        resolve(None, parse_spec("bogus"), [])


def test_threads_are_shared_between_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert [threads_per_job(w) for w in (1, 2, 3, 16)] == [8, 4, 2, 1]


# ------------------------------------------------------------------------------------------------ end to end
def compare_args(images: Path, out: Path, workers: int, *extra: str) -> list[str]:
    sets = [*(o for o in TINY_VIT_OVERRIDES if not o.startswith("inflora.")), f"data.options={{root: {images}}}",
            "scenario.num_tasks=2", "train.epochs=1", "train.lr=0.01", "classifier=linear", "inflora.rank=4",
            *extra]
    return ["compare", "--methods", "inflora,head=frozen[train.head_lr=0.02]", "--seeds", "0,1", "--out", str(out),
            "--workers", str(workers), *(a for s in sets for a in ("--set", s))]


def job_log_headers(out: Path) -> dict[str, int]:
    return {p.name: p.read_text().count("=== ") for p in sorted((out / "logs").glob("*.log"))}


def test_compare_runs_resumes_skips_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    images = make_image_folder(tmp_path / "images")
    out = tmp_path / "cmp"
    # 1. two at a time; every seed-1 run is killed (as by SIGKILL) at the start of its second task
    monkeypatch.setenv(faults.FAULT_ENV, "train:seed=1:task=1:epoch=0:step=0")
    assert main(compare_args(images, out, workers=2)) == 1
    err = capsys.readouterr().err
    assert "2 run(s) failed" in err and "inflora seed 1" in err and "head seed 1" in err
    assert "(new, 1 threads)" in (out / "logs" / "inflora-seed_0.log").read_text()  # 2 threads shared by 2 workers
    for label in ("inflora", "head"):
        assert (out / label / "seed_0" / "results.json").is_file()
        half = out / label / "seed_1"
        assert not (half / "results.json").exists() and (half / "checkpoints" / "latest").read_text() == "task_001\n"
    partial = json.loads((out / "comparison.json").read_text())
    assert [m["seeds"] for m in partial["methods"]] == [[0], [0]]
    assert partial["missing"] == {"inflora": [1], "head": [1]}
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed_0/*") if p.is_file()}
    headers = job_log_headers(out)

    # 2. one at a time: the finished runs are skipped, the killed ones resume from their checkpoints
    monkeypatch.delenv(faults.FAULT_ENV)
    assert main(compare_args(images, out, workers=1)) == 0
    assert "2 of 4 runs already finished: skipped" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert job_log_headers(out) == {n: c + ("seed_1" in n) for n, c in headers.items()}
    for label in ("inflora", "head"):
        log = (out / label / "seed_1" / "run.log").read_text()
        assert "resumed from" in log and "task_001" in log
        assert "(resume, 2 threads)" in (out / "logs" / f"{label}-seed_1.log").read_text()
    results = {(label, s): json.loads((out / label / f"seed_{s}" / "results.json").read_text())
               for label in ("inflora", "head") for s in (0, 1)}
    assert results["head", 0]["method"] == "frozen" and results["head", 0]["config"]["train"]["head_lr"] == 0.02
    assert "inflora" not in results["head", 0]["config"]  # the InfLoRA option went to InfLoRA only
    assert results["inflora", 1]["config"]["inflora"]["rank"] == 4

    table = json.loads((out / "comparison.json").read_text())
    assert not table["missing"] and [m["label"] for m in table["methods"]] == ["inflora", "head"]
    for m in table["methods"]:
        finals = [results[m["label"], s]["final_accuracy"] for s in (0, 1)]
        assert m["metrics"]["final_accuracy"]["mean"] == pytest.approx(sum(finals) / 2)
        assert m["metrics"]["final_accuracy"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
    assert {"comparison.md", "comparison.csv", "report.html", "compare.json"} <= {p.name for p in out.iterdir()}
    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.name for p in pngs} >= {"accuracy_curves.png", "heatmap-inflora.png", "heatmap-head.png",
                                      "memory-inflora.png", "time_per_task.png"}
    assert not (out / "figures" / "memory-head.png").exists()  # the frozen backbone keeps no memory
    assert sorted(embedded_pngs(read_page(out / "report.html"))) == sorted(p.read_bytes() for p in pngs)

    # 3. `inflora report` redraws the same tables from the saved runs
    before = (out / "comparison.json").read_text()
    (out / "comparison.json").unlink()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "comparison.json").read_text() == before and (out / "report.html").is_file()
    assert list(collect(out)[1]) == ["inflora", "head"]

    # 4. another configuration into the same folders is refused before anything runs
    capsys.readouterr()
    assert main(compare_args(images, out, 1, "train.lr=0.02")) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "train.lr: saved 0.01, now 0.02" in err and "seed_0" in err
    assert job_log_headers(out) == {n: c + ("seed_1" in n) for n, c in headers.items()}

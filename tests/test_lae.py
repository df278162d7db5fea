"""LAE (``lae``): LoRA branches on one output slice, the offline PET as the EMA of the online one (formula computed
here), the PET frozen during calibration epochs, the ensemble as the maximum of the two softmaxes (computed here on
merged copies), what trains, state round trip, tiny end-to-end runs (ViT, BERT)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import TINY_VIT_OVERRIDES, for_method, make_image_folder
from inflora.config import ConfigError, load_config
from inflora.engine import Experiment
from inflora.learners import LAELearner
from inflora.lora import LoRALinear, use_branches
from inflora.training import train_task
from tiny_text import tiny_text_benchmark, tiny_text_overrides


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def tiny(root: Path, *extra: str):
    return load_config("clinc150", for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {root}}}",
                                               "scenario.num_tasks=2", "scenario.order=natural", "train.epochs=2",
                                               "train.lr=0.01", "classifier=linear", "method=lae", "lae.blocks=2",
                                               "lae.decay=0.9", *extra]))


def pet(learner: LAELearner, kind: str) -> dict[tuple[int, str], torch.Tensor]:
    """Every factor and scale of the online or offline PET, float64 copies keyed by (layer, branch.key)."""
    return {(i, f"{name[len(kind):]}.{key}"): t.detach().double().clone()
            for i, name, branch in learner.pet(kind)
            for key, t in zip(("down", "up", "scale"), learner.tensors(branch), strict=True)}


def same(a: dict[tuple[int, str], torch.Tensor], b: dict[tuple[int, str], torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ the generic layer
def test_a_branch_on_one_output_slice() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 9)
    layer = LoRALinear(base, [(3, 6), (6, 9)])
    x = torch.randn(4, 6)
    plain = base(x).detach()
    k = layer.add_branch("k", torch.randn(2, 6), torch.randn(3, 2), learn_scale=True, slices=[0])
    v = layer.add_branch("v", torch.randn(2, 6), torch.randn(3, 2), scale=0.5, slices=[1])
    with torch.no_grad():
        k.scale.fill_(1.5)  # type: ignore[union-attr]
        out = layer(x)
        assert torch.equal(out[:, :3], plain[:, :3])
        assert torch.allclose(out[:, 3:6], plain[:, 3:6] + 1.5 * x @ k.down.T @ k.up.T, atol=1e-6)
        assert torch.allclose(out[:, 6:], plain[:, 6:] + 0.5 * x @ v.down.T @ v.up.T, atol=1e-6)
        layer.merge("k")
        assert torch.allclose(layer(x), out, atol=1e-6) and layer.merged["k"].slices == (0,)
        layer.unmerge("k")
        assert torch.allclose(layer.base.weight, base.weight) and layer.branch("k").slices == (0,)
    with pytest.raises(ValueError, match="up-projection"):
        layer.add_branch("w", torch.randn(2, 6), torch.randn(6, 2), slices=[1])
    with pytest.raises(ValueError, match="indices"):
        layer.add_branch("w", torch.randn(2, 6), slices=[2])


# ------------------------------------------------------------------------------------------ what trains
def test_only_the_online_pet_and_the_new_head_train(images: Path) -> None:
    experiment = Experiment(tiny(images))
    learner = experiment.learner
    assert isinstance(learner, LAELearner)
    assert len(learner.layers) == 2 and all(set(layer.branches) == {"online0", "online1"} for layer in learner.layers)
    for layer in learner.layers:  # one LoRA on k, one on v, each with its own learnable scale 1
        assert [layer.branch(f"online{i}").slices for i in range(2)] == [(0,), (1,)]
        assert all(float(layer.branch(f"online{i}").scale) == 1.0 for i in range(2))
    base = {k: v.clone() for k, v in experiment.backbone.state_dict().items() if ".branches." not in k}
    experiment.run_task(0)
    ctx = experiment.context(1)
    learner.begin_task(ctx)
    groups = learner.parameter_groups(ctx)
    online = {id(t) for _, _, b in learner.pet("online") for t in learner.tensors(b)}
    assert {id(p) for p in groups[0]["params"]} == online and len(online) == 2 * 2 * 3
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in learner.classifier.heads[1].parameters()}
    assert not any(t.requires_grad for _, _, b in learner.pet("offline") for t in learner.tensors(b))
    head0 = [p.detach().clone() for p in learner.classifier.heads[0].parameters()]
    train_task(learner, ctx, experiment.data, experiment.config.train)
    learner.end_task(ctx)
    after = {k: v for k, v in experiment.backbone.state_dict().items() if ".branches." not in k}
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)
    assert all(torch.equal(a, b) for a, b in zip(head0, learner.classifier.heads[0].parameters(), strict=True))
    with pytest.raises(NotImplementedError, match="two models"):
        learner.export_parts(1)


# ------------------------------------------------------------------------------------------ EMA and calibration
def test_the_offline_pet_is_the_ema_of_the_online_one(images: Path) -> None:
    experiment = Experiment(tiny(images, "lae.freeze_epochs=0"))
    learner = experiment.learner
    experiment.run_task(0)
    assert not learner.has_offline  # created when task 1 starts
    ctx = experiment.context(1)
    learner.begin_task(ctx)
    expected = pet(learner, "online")
    assert same(pet(learner, "offline"), expected)  # a copy of the online PET after task 0
    states: list[dict[tuple[int, str], torch.Tensor]] = []
    step = learner.training_step

    def recording_step(inputs: Any, labels: torch.Tensor, context: Any) -> Any:
        states.append(pet(learner, "online"))  # the online PET after the previous optimiser step
        return step(inputs, labels, context)

    learner.training_step = recording_step  # type: ignore[method-assign]
    train_task(learner, ctx, experiment.data, experiment.config.train)
    learner.end_task(ctx)
    states.append(pet(learner, "online"))
    for state in states[1:]:  # one EMA step after every optimiser step
        expected = {k: 0.9 * expected[k] + 0.1 * state[k] for k in expected}
    got = pet(learner, "offline")
    assert len(states) - 1 == learner.ema_updates == 4  # 2 epochs x 2 batches of 8
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert not all(torch.allclose(got[k], states[-1][k]) for k in got)  # it lags behind the online PET


def test_the_pet_stays_frozen_during_calibration_epochs(images: Path) -> None:
    experiment = Experiment(tiny(images, "train.epochs=3", "lae.freeze_epochs=2"))
    learner = experiment.learner
    at_epoch: dict[tuple[int, int], dict[tuple[int, str], torch.Tensor]] = {}
    heads: dict[tuple[int, int], torch.Tensor] = {}
    begin = learner.begin_epoch

    def recording_begin(epoch: int, ctx: Any) -> None:
        begin(epoch, ctx)
        at_epoch[(ctx.index, epoch)] = pet(learner, "online")
        heads[(ctx.index, epoch)] = learner.classifier.heads[ctx.index].weight.detach().clone()

    learner.begin_epoch = recording_begin  # type: ignore[method-assign]
    experiment.run()
    assert not same(at_epoch[(0, 0)], at_epoch[(0, 1)])  # task 0: no calibration
    assert same(at_epoch[(1, 0)], at_epoch[(1, 2)])  # task 1: head only for two epochs ...
    assert not torch.equal(heads[(1, 0)], heads[(1, 2)])  # ... while the head learns
    assert not same(pet(learner, "online"), at_epoch[(1, 2)])  # then the PET trains
    assert [d["calibration_epochs"] for d in experiment.state.diagnostics] == [0, 2]
    assert learner.ema_updates == 6  # the offline PET follows every step, calibration included


# ------------------------------------------------------------------------------------------ inference and state
def _merged_logits(learner: LAELearner, kind: str, x: torch.Tensor, upto: int) -> torch.Tensor:
    """The test's own model ``kind``: a copy of the backbone with that PET folded into the weights, no branch."""
    backbone = copy.deepcopy(learner.backbone)
    layers = [m for m in backbone.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        for name in [n for n in layer.branches if n.startswith(kind)]:
            layer.merge(name)
    with use_branches(layers, []):
        return learner.classifier.logits(backbone(x), upto)


def test_the_ensemble_is_the_max_of_the_two_softmaxes_and_state_round_trips(images: Path) -> None:
    config = tiny(images)
    experiment = Experiment(config)
    results = experiment.run()
    learner = experiment.learner
    assert results["diagnostics"][-1]["ema_updates"] == 4 and results["diagnostics"][-1]["offline_gap"] > 0
    learner.train_mode(False)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for _, _, branch in learner.pet("offline"):  # make the two models clearly different
            branch.up.mul_(-3.0)
        online = _merged_logits(learner, "online", x, 1).softmax(-1)
        offline = _merged_logits(learner, "offline", x, 1).softmax(-1)
        assert not torch.allclose(online, offline, atol=1e-3)
        assert torch.allclose(learner.predict(x, 1).exp(), torch.maximum(online, offline), atol=1e-5)
        state = learner.state_dict()
        assert all(v.device.type == "cpu" for v in state.values())
        fresh = Experiment(config).learner
        fresh.load_state_dict(state)
        fresh.train_mode(False)
        assert torch.equal(fresh.predict(x, 1), learner.predict(x, 1))
    assert fresh.ema_updates == learner.ema_updates and same(pet(fresh, "offline"), pet(learner, "offline"))
    with pytest.raises(ValueError, match="online and offline"):
        Experiment(config).learner.load_state_dict({k: v for k, v in state.items() if "offline1.up" not in k})


def test_text_run_on_a_tiny_bert(tmp_path: Path) -> None:
    root = tiny_text_benchmark(tmp_path)
    config = load_config("clinc150", [*tiny_text_overrides(root), "train.epochs=3", "method=lae", "lae.blocks=2",
                                      "lae.decay=0.5"])
    experiment = Experiment(config)
    results = experiment.run()
    learner = experiment.learner
    assert len(learner.layers) == 4  # key and value of two layers, one LoRA each
    assert all(set(layer.branches) == {"online0", "offline0"} for layer in learner.layers)
    assert [d["calibration_epochs"] for d in results["diagnostics"]] == [0, 1]  # floor(0.6 x 3) for task 1
    assert results["diagnostics"][-1]["ema_updates"] == 3 * 2  # 16 utterances a task, batches of 8


@pytest.mark.parametrize(("override", "message"), [
    ("lae.decay=1.0", "decay must lie in"),
    ("lae.freeze_fraction=1.0", "freeze_fraction must lie in"),
    ("lae.freeze_epochs=-1", "freeze_epochs must be"),
    ("lae.rank=0", "rank must be >= 1"),
])
def test_bad_options_are_explained(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method=lae", override])


def test_calibration_must_leave_an_epoch_to_train_the_pet(images: Path) -> None:
    with pytest.raises(ValueError, match=r"freeze_epochs=2 leaves no epoch.*train.epochs=2"):
        Experiment(tiny(images, "lae.freeze_epochs=2"))
    one_epoch = Experiment(tiny(images, "train.epochs=1")).learner
    assert one_epoch.freeze_epochs == 0  # the text preset's single epoch: no calibration by the default share


def test_a_resumed_run_repeats_an_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints hold both PETs and the EMA counter: a run stopped in task 2 (after the offline PET exists) and
    resumed ends bit-identical to an uninterrupted one."""
    from test_checkpoint import resumed_and_reference

    images = make_image_folder(tmp_path / "images", classes=6)
    sets = for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {images}}}", "scenario.num_tasks=3",
                       "scenario.order=natural", "train.epochs=2", "train.lr=0.01", "classifier=linear",
                       "train.device=cpu", "method=lae", "lae.blocks=2", "lae.decay=0.9"])
    resumed, reference = resumed_and_reference(tmp_path, monkeypatch, sets)
    assert resumed["diagnostics"][-1]["ema_updates"] == reference["diagnostics"][-1]["ema_updates"] == 8

"""The learner contract and the built-in policies: a learner written outside the package runs end to end; what
each built-in learner trains, keeps and replays; the domain-incremental layout end to end and exported."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

import inflora
from conftest import TINY_VIT_OVERRIDES, for_method, make_image_folder
from inflora.classifiers import ClassLayout
from inflora.config import ConfigError, load_config, opt
from inflora.engine import Experiment
from inflora.learners import LEARNERS, Learner, StepOutput, TaskContext, register_learner
from inflora.lora import LoRALinear


def tiny(root: Path, *extra: str):
    return load_config("clinc150", for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {root}}}",
                                               "scenario.num_tasks=2", "scenario.order=natural", "train.epochs=1",
                                               "train.lr=0.01", "classifier=linear", *extra]))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


# ------------------------------------------------------------------------------------------ a learner from outside
@dataclass
class CentroidOptions:
    """Options of the test's learner."""

    margin: float = opt(0.0, "a constant added to the loss (shows that options reach the learner)")


class NearestCentroid(Learner):
    """A learner written outside the package: its own step (trains nothing but counts batches and logs a figure)
    and its own prediction (nearest class mean of the frozen features, ignoring the classifier's heads)."""

    options_type = CentroidOptions

    def __init__(self, setup) -> None:
        super().__init__(setup)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.steps = 0
        self.scale = torch.nn.Parameter(torch.ones((), device=self.device))

    def parameter_groups(self, ctx: TaskContext) -> list[dict]:
        return [{"params": [self.scale], "lr": 0.0}]

    def training_step(self, inputs, labels: torch.Tensor, ctx: TaskContext) -> StepOutput:
        self.steps += 1
        with torch.no_grad():
            features = self.features(inputs).float()
        for c in labels.unique().tolist():
            rows = features[labels == c]
            self.sums[c] = self.sums.get(c, torch.zeros(rows.shape[1])) + rows.sum(0)
            self.counts[c] = self.counts.get(c, 0) + len(rows)
        loss = self.scale * 0.0 + self.options.margin
        return StepOutput(loss, {"batch": float(len(labels))})

    def predict(self, inputs, upto: int) -> torch.Tensor:
        features = self.features(inputs).float()
        classes = sorted(c for c in self.sums if c < self.classifier.layout.seen(upto))
        means = torch.stack([self.sums[c] / self.counts[c] for c in classes])
        logits = torch.full((len(features), self.classifier.layout.seen(upto)), float("-inf"))
        logits[:, classes] = -torch.cdist(features, means)
        return logits

    def diagnostics(self) -> dict:
        return {**super().diagnostics(), "steps": self.steps}


def test_a_learner_from_outside_the_package_runs_end_to_end(images: Path) -> None:
    register_learner("test-centroid", replace=True)(NearestCentroid)
    try:
        config = tiny(images, "method=test-centroid", "test-centroid.margin=0.5")
        assert config.method_options.margin == 0.5
        results = Experiment(config).run()
        diagnostics = results["diagnostics"]
        assert [d["steps"] for d in diagnostics] == [2, 4]  # 8 training images a task, batches of 8 -> 2 steps
        assert diagnostics[0]["last_step"] == {"batch": 8.0}
        # its own prediction: nearest centroid of the coloured classes is perfect on this data
        assert results["accuracy_matrix"][-1] == [100.0, 100.0]
        with pytest.raises(ConfigError, match=r"test-centroid\.margin"):
            tiny(images, "method=test-centroid", "test-centroid.nope=1")
    finally:
        LEARNERS.pop("test-centroid", None)


# ------------------------------------------------------------------------------------------ built-in policies
def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_trains_only_the_heads(images: Path) -> None:
    experiment = Experiment(tiny(images, "method=frozen"))
    before = _params(experiment.backbone)
    experiment.run()
    after = _params(experiment.backbone)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    d = experiment.state.diagnostics[0]
    assert d["trainable_parameters"] == 48 * 2 + 2  # one head: 2 classes x 48 features + bias


def test_seqlora_trains_a_random_down_projection_and_keeps_no_memory(images: Path) -> None:
    experiment = Experiment(tiny(images, "method=seqlora"))
    learner = experiment.learner
    assert not hasattr(learner, "adapter")  # no InfLoRA memory at all
    ctx = experiment.context(0)
    torch.manual_seed(0)
    learner.begin_task(ctx)
    layer = learner.layers()[0]
    down0 = layer.branch("0").down.detach().clone()
    assert isinstance(layer.branch("0").down, torch.nn.Parameter)  # D trains
    bound = 1 / layer.in_features ** 0.5
    assert float(down0.abs().max()) <= bound  # PyTorch's default LoRA initialisation
    from inflora.training import train_task

    train_task(learner, ctx, experiment.data, experiment.config.train)
    assert not torch.equal(layer.branch("0").down.detach(), down0)  # ... and moved
    learner.end_task(ctx)
    assert "0" in layer.merged and not layer.branches  # merged after the task


def test_joint_replays_all_tasks_and_trains_every_seen_head(images: Path) -> None:
    experiment = Experiment(tiny(images, "method=joint"))
    learner = experiment.learner
    assert learner.training_tasks(1) == [0, 1]
    assert experiment.data.train_indices(learner.training_tasks(1)) == sorted(
        experiment.scenario.tasks[0].train_indices + experiment.scenario.tasks[1].train_indices)
    experiment.run_task(0)
    ctx = experiment.context(1)
    learner.begin_task(ctx)
    heads = learner.classifier.heads
    trained = {id(p) for g in learner.parameter_groups(ctx) for p in g["params"]}
    assert all(id(p) in trained for h in heads for p in h.parameters())


def test_inflora_trains_only_up_projections_and_heads(images: Path) -> None:
    experiment = Experiment(tiny(images))
    experiment.run_task(0)
    learner = experiment.learner
    ctx = experiment.context(1)
    learner.begin_task(ctx)
    groups = learner.parameter_groups(ctx)
    adapter_params = {id(p) for p in groups[0]["params"]}
    ups = {id(layer.branch("1").up) for layer in learner.adapter.layers().values()}
    assert adapter_params == ups
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in learner.classifier.heads[1].parameters()}
    assert not any(isinstance(layer.branch("1").down, torch.nn.Parameter)
                   for layer in learner.adapter.layers().values())


# ------------------------------------------------------------------------------------------ data passes
def test_training_augments_while_passes_stay_deterministic(images: Path) -> None:
    experiment = Experiment(tiny(images, "data.transforms=imagenet"))
    data = experiment.data
    first = [x for x, _ in data.feature_pass(0)]
    again = [x for x, _ in data.feature_pass(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # test transforms: deterministic
    stats_a = [x for x, _ in data.train_pass(0, None, "design")]
    stats_b = [x for x, _ in data.train_pass(0, None, "memory")]
    assert all(torch.equal(a, b) for a, b in zip(stats_a, stats_b, strict=True))  # seeded training transforms
    indices = data.train_indices([0])
    epoch = [x for x, _ in data.epoch_loader(indices, 16, 1)]
    other = [x for x, _ in data.epoch_loader(indices, 16, 2)]
    assert not torch.equal(torch.cat(epoch).sort(0).values, torch.cat(other).sort(0).values)  # augmented anew
    assert not torch.equal(torch.cat(stats_a).sort(0).values, torch.cat(first).sort(0).values)


def test_step_schedule() -> None:
    from types import SimpleNamespace

    from inflora.training import lr_factor

    train = SimpleNamespace(schedule="step", milestones=[2, 4], gamma=0.1, epochs=6)
    assert [round(lr_factor(train, e), 12) for e in range(6)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    constant = SimpleNamespace(schedule="constant", epochs=3)
    assert [lr_factor(constant, e) for e in range(3)] == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------ domain-incremental
def _domains(root: Path) -> Path:
    """Two DomainNet-style domains of 3 classes: colour patterns that differ per domain."""
    base = root / "domainnet"
    gen = torch.Generator().manual_seed(0)
    for d_idx, d in enumerate(("clipart", "real")):
        for split, n in (("train", 6), ("test", 3)):
            lines = []
            for label, cls in enumerate(("aircraft_carrier", "zebra", "the_eiffel_tower")):
                for i in range(n):
                    rel = f"{d}/{cls}/{d}_{split}_{i}.png"
                    (base / rel).parent.mkdir(parents=True, exist_ok=True)
                    colour = torch.zeros(3)
                    colour[label] = 200.0
                    noise = torch.rand(32, 32, 3, generator=gen) * 40 + 40 * d_idx
                    Image.fromarray((noise + colour).clamp(0, 255).byte().numpy()).save(base / rel)
                    lines.append(f"{rel} {label}")
            (base / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("method", ["inflora", "seqlora"])
def test_domain_incremental_run_and_export(tmp_path: Path, method: str) -> None:
    from inflora.export import ExportedModel, export_experiment

    root = _domains(tmp_path)
    config = load_config("clinc150", for_method([
        *TINY_VIT_OVERRIDES, "data.name=domainnet", f"data.data_dir={root}", "data.transforms=imagenet",
        "data.options={domains: [clipart, real]}", "scenario.kind=domain", "train.epochs=2", "train.lr=0.01",
        "classifier=aligned", "aligned.epochs=2", "aligned.samples_per_class=16", f"method={method}"]))
    experiment = Experiment(config)
    results = experiment.run()
    assert results["classes_per_task"] == [3, 3] and len(experiment.learner.classifier.heads) == 1  # one shared head
    assert results["task_il_matrix"] == results["accuracy_matrix"]  # no task identity to exploit in domains
    assert results["task_id_matrix"] == [[100.0], [100.0, 100.0]]
    assert results["accuracy_matrix"][-1][-1] >= 66.0  # 3 colour classes: learnable (measured 100)
    manifest = export_experiment(experiment, tmp_path / "model")
    assert manifest["num_classes"] == 3 and manifest["scenario"] == "domain"
    model = ExportedModel.load(tmp_path / "model")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    experiment.learner.train_mode(False)
    with torch.no_grad():
        assert torch.allclose(model(x), experiment.learner.predict(x, 1), atol=1e-4)
    assert json.loads((tmp_path / "model" / "class_names.json").read_text()) == [
        "aircraft_carrier", "zebra", "the_eiffel_tower"]


# ------------------------------------------------------------------------------------------ generic LoRA layer
def test_lora_layer_branches_scale_routing_merge_and_unmerge() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 9)
    layer = LoRALinear(base, [(3, 6), (6, 9)])
    x = torch.randn(4, 6)
    plain = base(x).detach()
    a = layer.add_branch("a", torch.randn(2, 6), torch.randn(6, 2), scale=0.5)
    b = layer.add_branch("b", torch.randn(3, 6), torch.randn(6, 3), train_down=True, train_up=False)
    assert isinstance(b.down, torch.nn.Parameter) and not isinstance(b.up, torch.nn.Parameter)

    def delta(branch) -> torch.Tensor:
        return float(branch.scale) * x @ branch.down.T @ branch.up.T

    with torch.no_grad():
        both = layer(x)
        assert torch.allclose(both[:, :3], plain[:, :3])  # q untouched
        assert torch.allclose(both[:, 3:], plain[:, 3:] + delta(a) + delta(b), atol=1e-6)
        with layer.use(["a"]):
            assert torch.allclose(layer(x)[:, 3:], plain[:, 3:] + delta(a), atol=1e-6)
        with layer.use([]):
            assert torch.equal(layer(x), plain)
        layer.merge("a")
        assert torch.allclose(layer(x), both, atol=1e-6)  # merged equals unmerged
        assert list(layer.branches) == ["b"] and "a" in layer.merged
        layer.unmerge("a")
        assert torch.allclose(layer.base.weight, base.weight) and torch.allclose(layer(x), both, atol=1e-6)
    b.set_trainable(down=False, up=True)
    assert isinstance(b.up, torch.nn.Parameter) and not isinstance(b.down, torch.nn.Parameter)
    magnitude = layer.add_branch("m", torch.randn(1, 6), torch.randn(6, 1), learn_scale=True)
    assert isinstance(magnitude.scale, torch.nn.Parameter)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_branch("a", torch.randn(2, 6))
    with pytest.raises(ValueError, match="does not fit"):
        layer.add_branch("z", torch.randn(2, 5))


def test_wrapping_is_all_or_nothing() -> None:
    from conftest import mlp

    model = mlp()
    with pytest.raises(AttributeError):
        inflora.lora.wrap_linears(model, [("0", None), ("9", None)])  # the second layer does not exist
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


# ------------------------------------------------------------------------------------------ adapter inspection
def test_old_space_is_the_memory_whatever_its_mode() -> None:
    from conftest import mlp
    from test_adapter import batches

    torch.manual_seed(0)
    model = mlp()
    adapter = inflora.attach(model, targets=r"^2$", rank=2, num_tasks=8, lamb=0.999, memory="dualgpm")
    seen_modes = set()
    for _ in range(8):
        x = torch.randn(40, 16)
        adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(x)))
        adapter.end_task(inflora.collect_input_stats(model, adapter, batches(x)))
        site = next(iter(adapter.sites))
        memory = adapter.sites[site].memory
        seen_modes.add(memory.mode)
        basis = adapter.old_space(site)
        assert basis.dtype == torch.float64 and basis.shape == (32, memory.memory_dim)
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-10)
        assert torch.allclose(basis @ basis.T, memory.old_projector(), atol=1e-10)
    assert seen_modes == {"basis", "complement"}


def test_fewer_free_directions_than_rank_warns_once_and_is_recorded() -> None:
    from conftest import mlp
    from test_adapter import batches

    torch.manual_seed(0)
    model = mlp()
    adapter = inflora.attach(model, targets=r"^0$", rank=6, num_tasks=6, lamb=1.0, lame=1.0)
    logger = logging.getLogger("inflora")  # a handler of our own: the CLI's setup may stop propagation
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for _ in range(5):
            x = torch.randn(64, 16)
            designed = adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(x)))
            down = next(iter(designed.values()))
            assert torch.allclose(3 * down.double() @ down.double().T, torch.eye(down.shape[0], dtype=torch.float64),
                                  atol=1e-6)
            adapter.end_task(inflora.collect_input_stats(model, adapter, batches(x)))
    finally:
        logger.removeHandler(handler)
    rows = [len(d) for d in adapter.sites["0"].downs]
    assert rows[0] == 6 and min(rows) < 6  # the 16-d input space fills up
    assert sum("fewer than rank" in r.getMessage() for r in records) == 1
    assert any(adapter.short)


# ------------------------------------------------------------------------------------------ the fused text pass
def _text_learner(tasks: int = 2):
    from conftest import tiny_bert
    from inflora.backbones import HFTextBackbone
    from inflora.classifiers.aligned import AlignedHeads, AlignedOptions
    from inflora.config import TrainConfig
    from inflora.learners import LearnerSetup
    from inflora.learners.lora import InfLoRALearner, InfLoRAOptions
    from inflora.runtime import Runtime

    backbone = HFTextBackbone.from_model(tiny_bert(), tokenizer=None)
    layout = ClassLayout.create("class", [2] * tasks)
    classifier = AlignedHeads(backbone.feature_dim, layout, AlignedOptions(epochs=1, samples_per_class=8),
                              torch.device("cpu"))
    setup = LearnerSetup(backbone, classifier, InfLoRAOptions(rank=2, energy="gpm", lamb=0.9), TrainConfig(),
                         Runtime(torch.device("cpu")), tasks, 0)
    return InfLoRALearner(setup)


def _text_batches(seed: int) -> list[tuple[dict, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        ids = torch.randint(1, 60, (4, 7), generator=gen)
        mask = torch.ones(4, 7, dtype=torch.long)
        mask[:2, 5:] = 0  # padding
        out.append(({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (4,), generator=gen)))
    return out


def test_text_memory_pass_is_fused_with_the_classifier_pass() -> None:
    """With no transforms (text) one pass feeds the memory and the class statistics; the result equals the two
    separate passes over the same samples."""
    from inflora.alignment import ClassStatistics

    calls = {"feature": 0, "train": 0}
    batches = _text_batches(0)

    def feature_pass():
        calls["feature"] += 1
        return iter(batches)

    def train_pass(limit=None, phase="design"):
        calls["train"] += 1
        return iter(batches)

    memories, stats = [], []
    for same_inputs in (True, False):
        learner = _text_learner()
        ctx = TaskContext(0, 2, [0, 1], 0, learner.runtime, train_pass, feature_pass, same_inputs=same_inputs)
        calls.update(feature=0, train=0)
        learner.begin_task(ctx)
        learner.end_task(ctx)
        assert calls == ({"feature": 1, "train": 1} if same_inputs else {"feature": 1, "train": 2})
        assert learner.diagnostics()["memory_pass"].startswith("fused" if same_inputs else "separate")
        memories.append({n: learner.adapter.old_space(n) for n in learner.adapter.sites})
        s: ClassStatistics = learner.classifier.stats
        stats.append({c: (s.counts[c], s.sums[c]) for c in s.counts})
    for name, basis in memories[0].items():
        other = memories[1][name]
        assert basis.shape == other.shape and torch.allclose(basis @ basis.T, other @ other.T, atol=1e-8)
    assert stats[0].keys() == stats[1].keys()
    for c, (count, total) in stats[0].items():
        assert count == stats[1][c][0] and torch.allclose(total, stats[1][c][1])

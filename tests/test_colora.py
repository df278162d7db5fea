"""CoLoR (``colora``): k-means against an independent computation, routing by nearest centroid (constructed),
per-sample routing of mixed batches, old branches kept bit-identical and unmerged, the backbone frozen, the oracle,
state round trip, tiny end-to-end runs (ViT class- and domain-incremental, BERT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_VIT_OVERRIDES, for_method, make_image_folder
from inflora.backbones import build_backbone
from inflora.classifiers import ClassLayout
from inflora.classifiers.linear import LinearHeads
from inflora.config import ConfigError, TrainConfig, load_config
from inflora.engine import Experiment
from inflora.evaluation import evaluate
from inflora.kmeans import kmeans, lloyd
from inflora.learners import CoLoRLearner, CoLoROptions, LearnerSetup, TaskContext
from inflora.lora import use_branches
from inflora.metrics import routing_accuracy
from inflora.runtime import Runtime
from inflora.training import train_task
from tiny_text import tiny_text_benchmark, tiny_text_overrides

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def tiny(root: Path, *extra: str):
    return load_config("clinc150", for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {root}}}",
                                               "scenario.num_tasks=2", "scenario.order=natural", "train.epochs=2",
                                               "train.lr=0.01", "classifier=linear", "method=colora",
                                               "colora.rank=4", "colora.k=3", *extra]))


# ------------------------------------------------------------------------------------------ k-means
def test_kmeans_is_a_lloyd_fixed_point_that_finds_separated_blobs() -> None:
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 3.0]], dtype=torch.float64)
    truth = torch.arange(3).repeat_interleave(20)
    x = means[truth] + 0.3 * torch.randn(60, 3, generator=gen, dtype=torch.float64)
    result = kmeans(x, 3, generator=torch.Generator().manual_seed(1), iterations=50, restarts=3)
    points, centres = x.numpy(), result.centroids.numpy()
    brute = np.array([int(np.argmin([((p - c) ** 2).sum() for c in centres])) for p in points])
    assert (brute == result.labels.numpy()).all()  # every point at its nearest centre
    for j in range(3):  # every centre at the mean of its points
        assert np.allclose(centres[j], points[brute == j].mean(0), atol=1e-12)
    inertia = sum(((p - centres[j]) ** 2).sum() for p, j in zip(points, brute, strict=True))
    assert result.inertia == pytest.approx(inertia, rel=1e-12)
    assert all(b <= a + 1e-9 for a, b in zip(result.history, result.history[1:], strict=False))  # Lloyd descends
    pairs = {(int(t), int(c)) for t, c in zip(truth, result.labels, strict=True)}
    assert len(pairs) == 3  # the clusters are the blobs
    again = kmeans(x, 3, generator=torch.Generator().manual_seed(1), iterations=50, restarts=3)
    assert torch.equal(again.centroids, result.centroids)  # seeded
    with pytest.raises(ValueError, match="at least k points"):
        kmeans(x[:2], 3, generator=gen)


def test_an_empty_cluster_moves_to_the_farthest_point() -> None:
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]], dtype=torch.float64)
    start = torch.tensor([[5.0], [6.0], [100.0]], dtype=torch.float64)  # the third centre wins no point
    result = lloyd(x, start, iterations=20)
    assert torch.bincount(result.labels, minlength=3).min() >= 1
    assert result.inertia < float(((x - start[:2].T).abs().min(1).values ** 2).sum())


# ------------------------------------------------------------------------------------------ a learner built by hand
def _batches(seed: int, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 3, 32, 32, generator=gen) + seed, torch.zeros(n, dtype=torch.long))]


def _learner(oracle: bool = False, tasks: int = 2) -> CoLoRLearner:
    torch.manual_seed(0)
    backbone = build_backbone("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3)
    layout = ClassLayout.create("class", [2] * tasks)
    setup = LearnerSetup(backbone, LinearHeads(48, layout, None, CPU), CoLoROptions(rank=4, k=2, oracle=oracle),
                         TrainConfig(), Runtime(CPU), tasks, 0)
    learner = CoLoRLearner(setup)
    for t in range(tasks):  # begin and end each task without training, then give every branch its own update
        ctx = TaskContext(t, tasks, [2 * t, 2 * t + 1], 0, learner.runtime,
                          lambda limit=None, phase="design", t=t: iter(_batches(t)), lambda t=t: iter(_batches(t)))
        learner.begin_task(ctx)
        learner.end_task(ctx)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in learner.layers():
            for t in range(tasks):
                layer.branch(str(t)).up.copy_(torch.randn(layer.branch(str(t)).up.shape, generator=gen))
    learner.train_mode(False)
    return learner


def _through(learner: CoLoRLearner, x: torch.Tensor, task: int) -> torch.Tensor:
    """The test's own routing: the backbone with branch ``task`` alone, then every head."""
    with use_branches(learner.layers(), [str(task)]):
        return learner.classifier.logits(learner.backbone(x), len(learner.centroids) - 1)


@torch.no_grad()
def test_a_sample_goes_through_the_branch_of_its_nearest_centroid() -> None:
    learner = _learner()
    a, b = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.zeros(1, 3, 32, 32)
    x = torch.cat([a, b])
    feats = learner.frozen_features(x)
    for order in ([0, 1], [1, 0]):  # centroid of task order[i] placed on sample i
        learner.centroids = [feats[order.index(t)][None] for t in range(2)]
        assert learner.identify(x, 1).tolist() == order
        logits = learner.predict(x, 1)
        for i, task in enumerate(order):
            own = _through(learner, x[i : i + 1], task)[0]
            inside = slice(2 * task, 2 * task + 2)
            assert torch.allclose(logits[i, inside], own[inside], atol=1e-5)  # its task's head, through its branch
            outside = torch.ones(4, dtype=torch.bool)
            outside[inside] = False
            assert logits[i, outside].max() < logits[i, inside].min()  # class-IL stays inside the task
            assert torch.equal(logits[i, outside].argsort(), own[outside].argsort())  # other logits keep their order
            assert int(logits[i].argmax()) // 2 == task


@torch.no_grad()
def test_mixed_batches_are_routed_per_sample() -> None:
    learner = _learner()
    x = torch.cat([_batches(0)[0][0][:3], _batches(1)[0][0][:3]])[[0, 3, 1, 4, 2, 5]]
    tasks = learner.identify(x, 1)
    assert set(tasks.tolist()) == {0, 1}  # the batch mixes both tasks
    together = learner.predict(x, 1)
    alone = torch.cat([learner.predict(x[i : i + 1], 1) for i in range(len(x))])
    assert torch.allclose(together, alone, atol=1e-5)


@torch.no_grad()
def test_oracle_scores_each_task_through_its_own_branch_and_keeps_the_routing() -> None:
    routed, oracle = _learner(), _learner(oracle=True)
    x = torch.cat([_batches(0)[0][0][:3], _batches(1)[0][0][:3]])
    plain, full = routed.predict(x, 1), oracle.predict(x, 1)
    assert torch.equal(plain.argmax(1), full.argmax(1))  # class-IL: the same centroid routing
    tasks = oracle.identify(x, 1)
    for task in range(2):
        own = _through(oracle, x, task)[:, 2 * task : 2 * task + 2]
        chosen = tasks == task
        assert torch.allclose(full[chosen, 2 * task : 2 * task + 2], own[chosen], atol=1e-5)
        # task-IL (argmax inside the true task) reads the true task's branch and head, whatever the routing
        assert torch.equal(full[:, 2 * task : 2 * task + 2].argmax(1), own.argmax(1))
    layout = ClassLayout.create("domain", [2, 2])
    setup = LearnerSetup(build_backbone("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                        depth=1, embed_dim=48, num_heads=3),
                         LinearHeads(48, layout, None, CPU), CoLoROptions(oracle=True), TrainConfig(), Runtime(CPU),
                         2, 0)
    with pytest.raises(ValueError, match="class-incremental"):
        CoLoRLearner(setup)


# ------------------------------------------------------------------------------------------ through the engine
def _snapshot(learner: CoLoRLearner, task: int) -> list[torch.Tensor]:
    return [t.detach().clone() for layer in learner.layers() for t in (layer.branch(str(task)).down,
                                                                      layer.branch(str(task)).up)]


def test_old_branches_stay_bit_identical_unmerged_and_the_backbone_frozen(images: Path) -> None:
    experiment = Experiment(tiny(images))
    learner = experiment.learner
    assert isinstance(learner, CoLoRLearner)
    base = {k: v.clone() for k, v in experiment.backbone.state_dict().items() if ".branches." not in k}
    experiment.run_task(0)
    first = _snapshot(learner, 0)
    ctx = experiment.context(1)
    learner.begin_task(ctx)
    groups = learner.parameter_groups(ctx)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for layer in learner.layers()
                                                    for p in (layer.branch("1").down, layer.branch("1").up)}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in learner.classifier.heads[1].parameters()}
    assert not any(isinstance(t, torch.nn.Parameter) for layer in learner.layers()
                   for t in (layer.branch("0").down, layer.branch("0").up))  # the old branch is frozen
    train_task(learner, ctx, experiment.data, experiment.config.train)
    learner.end_task(ctx)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(learner, 0), first, strict=True))
    assert all(not layer.merged and set(layer.branches) == {"0", "1"} for layer in learner.layers())
    after = {k: v for k, v in experiment.backbone.state_dict().items() if ".branches." not in k}
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)
    assert any(float(t.abs().max()) > 0 for layer in learner.layers() for t in (layer.branch("1").up,))


def test_class_incremental_run_identifies_every_task_and_round_trips(images: Path) -> None:
    config = tiny(images)
    experiment = Experiment(config)
    results = experiment.run()
    assert results["task_id_matrix"] == [[100.0], [100.0, 100.0]]  # well-separated tasks: routing is perfect
    counts = experiment.data.eval_counts()
    assert [d["routing_matrix"] for d in results["diagnostics"]] == [[[counts[0]]], [[counts[0], 0], [0, counts[1]]]]
    assert [d["routing_accuracy"] for d in results["diagnostics"]] == [[100.0], [100.0, 100.0]]
    sizes = [len(task.train_indices) for task in experiment.scenario.tasks]
    assert [d["kmeans_points"] for d in results["diagnostics"]] == sizes  # all training samples clustered
    assert all(d["method_s"] > 0 for d in results["diagnostics"])
    learner = experiment.learner
    with pytest.raises(NotImplementedError, match="nearest k-means centroid"):
        learner.export_parts(1)
    state = learner.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    fresh = Experiment(config).learner
    fresh.load_state_dict(state)
    fresh.train_mode(False)
    learner.train_mode(False)
    batches, _ = experiment.data.eval_pass(1)
    with torch.no_grad():
        for inputs, _ in batches:
            assert torch.equal(fresh.predict(inputs, 1), learner.predict(inputs, 1))
    assert all(torch.equal(a, b) for a, b in zip(fresh.centroids, learner.centroids, strict=True))
    with pytest.raises(ValueError, match="centroids"):
        Experiment(config).learner.load_state_dict({k: v for k, v in state.items() if "centroids.1" not in k})


def test_routing_matrix_counts_each_sample_against_its_true_task(images: Path) -> None:
    """Centroids moved so that some samples go astray: the pass's routing counts equal a task-by-task recount with
    ``identify``, and in a class layout the routing accuracy is the task-id accuracy."""
    experiment = Experiment(tiny(images))
    experiment.run()
    learner, data = experiment.learner, experiment.data
    both = torch.cat(learner.centroids)
    learner.centroids = [both[::2].clone(), both[1::2].clone()]  # every task gets half of each task's centroids
    result = evaluate(learner, data, experiment.layout, 1)
    learner.train_mode(False)
    expected = []
    for j in range(2):
        dataset = data.split(data.eval_split, data.eval_indices(j), train_transforms=False)
        with torch.no_grad():
            tags = torch.cat([learner.identify(inputs, 1) for inputs, _ in data.loader(dataset, 4)])
        expected.append(torch.bincount(tags, minlength=2).tolist())
    assert result.routing == expected
    assert sum(expected[0][1:]) + expected[1][0] > 0  # the moved centroids do send samples astray
    assert routing_accuracy(expected) == pytest.approx(result.task_id)
    assert routing_accuracy([[3, 1], [0, 0]]) == [75.0, 0.0]


def test_oracle_run_changes_task_il_only(images: Path) -> None:
    plain = Experiment(tiny(images)).run()
    oracle = Experiment(tiny(images, "colora.oracle=true")).run()
    assert oracle["accuracy_matrix"] == plain["accuracy_matrix"]  # class-IL: the same centroid routing
    assert oracle["task_id_matrix"] == plain["task_id_matrix"]


def test_domain_incremental_run_routes_domains_through_one_shared_head(tmp_path: Path) -> None:
    from test_contract import _domains

    root = _domains(tmp_path)
    config = load_config("clinc150", for_method([
        *TINY_VIT_OVERRIDES, "data.name=domainnet", f"data.data_dir={root}", "data.transforms=imagenet",
        "data.options={domains: [clipart, real]}", "scenario.kind=domain", "train.epochs=2", "train.lr=0.01",
        "classifier=linear", "method=colora", "colora.rank=4", "colora.k=2"]))
    experiment = Experiment(config)
    results = experiment.run()
    assert len(experiment.learner.classifier.heads) == 1  # one shared head
    assert results["task_il_matrix"] == results["accuracy_matrix"]
    assert results["diagnostics"][-1]["routing_accuracy"] == [100.0, 100.0]  # each domain to its branch
    assert results["accuracy_matrix"][-1][-1] >= 66.0  # 3 colour classes: learnable


def test_text_run_on_a_tiny_bert(tmp_path: Path) -> None:
    root = tiny_text_benchmark(tmp_path)
    config = load_config("clinc150", [*tiny_text_overrides(root), "train.epochs=2", "method=colora",
                                      "colora.rank=4", "colora.k=2"])
    experiment = Experiment(config)
    results = experiment.run()
    layers = experiment.learner.layers()
    assert len(layers) == 4 and all(set(layer.branches) == {"0", "1"} for layer in layers)  # key, value x 2
    learner = experiment.learner
    learner.train_mode(False)
    batches, owner = experiment.data.eval_pass(1)
    hits, seen = torch.zeros(2), 0
    with torch.no_grad():
        for inputs, labels in batches:
            tasks = owner[seen : seen + len(labels)]
            seen += len(labels)
            hits.index_add_(0, tasks, (learner.identify(inputs, 1) == tasks).float())
    routing = (100 * hits / torch.tensor(experiment.data.eval_counts()[:2])).tolist()
    assert results["task_id_matrix"][-1] == pytest.approx(routing)  # the engine's task-id figure is the routing's
    assert min(routing) >= 75.0  # each task's intents use their own words


@pytest.mark.parametrize(("override", "message"), [
    ("colora.k=0", "k must be an integer >= 1"),
    ("colora.kmeans_restarts=0", "kmeans_restarts must be"),
    ("colora.kmeans_samples=0", "kmeans_samples must be"),
    ("colora.rank=0", "rank must be >= 1"),
])
def test_bad_options_are_explained(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method=colora", override])


def test_too_few_samples_for_k_is_a_clear_error(images: Path) -> None:
    experiment = Experiment(tiny(images, "colora.k=17"))
    with pytest.raises(ValueError, match="only 16 training samples"):
        experiment.run_task(0)


def test_a_resumed_run_repeats_an_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints hold every branch and every task's centroids: a run stopped in task 2 and resumed ends
    bit-identical to an uninterrupted one."""
    from test_checkpoint import resumed_and_reference

    images = make_image_folder(tmp_path / "images", classes=6)
    sets = for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {images}}}", "scenario.num_tasks=3",
                       "scenario.order=natural", "train.epochs=2", "train.lr=0.01", "classifier=linear",
                       "train.device=cpu", "method=colora", "colora.rank=4", "colora.k=3"])
    resumed_and_reference(tmp_path, monkeypatch, sets)


def test_every_rank_clusters_the_whole_pass_in_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun rank r holds the pass's samples r, r + W, ...: each rank places its share at those rows, so the
    sum over ranks (the all-reduce) is the unsharded pass, on every rank."""
    from inflora import distributed

    rows = torch.arange(14, dtype=torch.float64).reshape(7, 2)
    counts = torch.tensor([4, 3])
    placed = []
    for r in range(2):
        monkeypatch.setattr(distributed, "is_distributed", lambda: True)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: counts.clone() if t.dtype == torch.long else t)
        placed.append(distributed.gather_pass_rows(rows[r::2]))
    assert torch.equal(placed[0] + placed[1], rows)

"""Frozen-feature baselines: the ``prototype`` and ``ridge`` classifiers against formulas computed here, and the
``simplecil``, ``aper`` and ``ranpac`` learners (what trains, what stays frozen, state, end-to-end runs, config)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_VIT_OVERRIDES, for_method, make_image_folder
from inflora.classifiers import ClassLayout, PrototypeClassifier, PrototypeOptions, RidgeClassifier, RidgeOptions
from inflora.config import ConfigError, load_config, to_dict, validate
from inflora.engine import Experiment
from inflora.lora import LoRALinear, replace_module
from inflora.runtime import Purpose, derive_seed
from test_contract import _domains

CPU = torch.device("cpu")
LAMBDAS = [10.0 ** k for k in range(-8, 9)]


def _batches(features: torch.Tensor, labels: torch.Tensor, size: int = 7):
    return zip(features.split(size), labels.split(size), strict=True)


def _feed(classifier, task: int, features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    classifier.begin_task(task)
    for f, y in _batches(features, labels):
        classifier.observe(f, y, task)
    return classifier.end_task(task, seed)


# ------------------------------------------------------------------------------------------ prototype
def test_prototypes_are_class_means_and_logits_are_scaled_cosines() -> None:
    gen = torch.Generator().manual_seed(0)
    layout = ClassLayout.create("class", [3, 3])
    clf = PrototypeClassifier(5, layout, PrototypeOptions(scale=2.5), CPU)
    f0, y0 = torch.randn(20, 5, generator=gen), torch.arange(20) % 3
    _feed(clf, 0, f0, y0)
    f1, y1 = torch.randn(12, 5, generator=gen) + 1, 3 + torch.arange(12) % 2  # class 5 gets no sample
    before = clf.prototypes(0).clone()
    diag = _feed(clf, 1, f1, y1)
    assert diag == {"prototype_classes": 5}
    means = np.stack([f0.numpy()[y0.numpy() == c].mean(0) for c in range(3)]
                     + [f1.numpy()[y1.numpy() == c].mean(0) for c in (3, 4)])
    assert np.allclose(clf.prototypes(1)[:5].numpy(), means, atol=1e-12)
    assert torch.equal(clf.prototypes(1)[:3], before)  # old prototypes never change
    x = torch.randn(4, 5, generator=gen)
    xn = x.numpy().astype(np.float64)
    cosine = (xn / np.linalg.norm(xn, axis=1, keepdims=True)) @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    logits = clf.logits(x, 1)
    assert logits.shape == (4, 6) and np.allclose(logits[:, :5].numpy(), 2.5 * cosine, atol=1e-5)
    assert torch.isneginf(logits[:, 5]).all()  # a class without data cannot be predicted
    assert clf.logits(x, 0).shape == (4, 3)
    with pytest.raises(ValueError, match="old prototypes never change"):
        clf.observe(x, torch.tensor([0, 3, 3, 4]), 1)


def test_prototype_sums_accumulate_over_domains_and_export_needs_unit_features() -> None:
    gen = torch.Generator().manual_seed(1)
    layout = ClassLayout.create("domain", [3, 3])
    clf = PrototypeClassifier(4, layout, None, CPU)
    data = [(torch.randn(9, 4, generator=gen) + t, torch.arange(9) % 3) for t in range(2)]
    for t, (f, y) in enumerate(data):
        _feed(clf, t, f, y)
    f, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    means = torch.stack([f[y == c].double().mean(0) for c in range(3)])
    assert torch.allclose(clf.prototypes(1), means, atol=1e-12)  # means over both domains
    with pytest.raises(NotImplementedError, match="normalize"):
        clf.export_linear(1)
    clf.unit_features = True
    weight, bias = clf.export_linear(1)
    x = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    assert torch.allclose(x @ weight.T + bias, clf.logits(x, 1), atol=1e-6)


def test_the_training_head_is_a_temporary_cosine_head() -> None:
    layout = ClassLayout.create("class", [2, 3])
    clf = PrototypeClassifier(4, layout, PrototypeOptions(head_scale=3.0), CPU)
    with pytest.raises(RuntimeError, match="begin_task"):
        clf.loss(torch.randn(2, 4), torch.tensor([0, 1]), 0)
    _feed(clf, 0, torch.randn(6, 4), torch.arange(6) % 2)
    clf.begin_task(1)
    params = clf.parameters_for(1)
    assert [tuple(p.shape) for p in params] == [(3, 4), ()] and float(params[1].detach()) == 3.0
    f, y = torch.randn(6, 4), 2 + torch.arange(6) % 3
    w = torch.nn.functional.normalize(params[0].detach(), dim=-1)
    expected = torch.nn.functional.cross_entropy(3.0 * torch.nn.functional.normalize(f, dim=-1) @ w.T, y - 2)
    assert torch.allclose(clf.loss(f, y, 1), expected)
    assert [tuple(p.shape) for p in clf.parameters_for(1, all_seen=True)] == [(5, 4), ()]  # replaying learners
    for x, labels in _batches(f, y):
        clf.observe(x, labels, 1)
    clf.end_task(1, 0)
    assert clf.head is None and set(clf.state_tensors()) == {"sums", "counts"}


# ------------------------------------------------------------------------------------------ ridge
def _independent_ridge(h: np.ndarray, y: np.ndarray, order: np.ndarray, lambdas: list[float]) -> np.ndarray:
    """Held-out squared error of every lambda: fit on the first 80% of ``order``, score on the rest (numpy). With
    fewer fit rows than features, ``(H^T H + l I)^-1 H^T Y = H^T (H H^T + l I)^-1 Y`` is the well-conditioned form."""
    h, y = h[order], y[order]
    n = int(len(h) * 0.8)
    fit, held = h[:n], h[n:]
    assert n < h.shape[1]
    errors = []
    for lam in lambdas:
        w = fit.T @ np.linalg.solve(fit @ fit.T + lam * np.eye(n), y[:n])
        errors.append(((held @ w - y[n:]) ** 2).sum())
    return np.array(errors)


def test_ridge_head_is_the_closed_form_with_the_held_out_lambda() -> None:
    gen = torch.Generator().manual_seed(2)
    d, m, seed = 6, 40, 3
    layout = ClassLayout.create("class", [3, 3])
    clf = RidgeClassifier(d, layout, RidgeOptions(projection_dim=m), CPU)
    centres = torch.randn(6, d, generator=gen) * 2
    data = []
    for t in range(2):
        y = 3 * t + torch.arange(30) % 3
        y[::5] = 3 * t + (y[::5] + 1 - 3 * t) % 3  # noisy labels make the regularisation matter
        data.append((centres[3 * t + torch.arange(30) % 3] + torch.randn(30, d, generator=gen), y))
    gram, targets = np.zeros((m, m)), np.zeros((m, 6))
    for t, (f, y) in enumerate(data):
        diag = _feed(clf, t, f, y, seed)
        w = clf.projection.numpy()
        assert w.shape == (d, m)
        h = np.maximum(f.double().numpy() @ w, 0.0)
        onehot = np.eye(6)[y.numpy()]
        order = torch.randperm(30, generator=torch.Generator().manual_seed(
            derive_seed(seed, t, Purpose.RIDGE_SPLIT))).numpy()
        errors = _independent_ridge(h, onehot, order, LAMBDAS)
        best = int(errors.argmin())
        assert np.sort(errors)[1] > errors[best] * 1.01  # the choice is clear-cut, not a rounding tie
        assert diag["ridge_lambda"] == LAMBDAS[best]
        assert np.allclose(diag["ridge_heldout_sse"], errors, rtol=1e-6)
        gram, targets = gram + h.T @ h, targets + h.T @ onehot
        solved = np.linalg.solve(gram + LAMBDAS[best] * np.eye(m), targets)
        assert np.allclose(clf.weight.numpy(), solved, rtol=1e-8, atol=1e-10)
        x = torch.randn(5, d, generator=gen)
        logits = np.maximum(x.double().numpy() @ w, 0.0) @ solved[:, : 3 * (t + 1)]
        assert np.allclose(clf.logits(x, t).numpy(), logits, rtol=1e-5, atol=1e-6)
    again = RidgeClassifier(d, layout, RidgeOptions(projection_dim=m), CPU)
    _feed(again, 0, *data[0], seed)
    assert torch.equal(again.projection, clf.projection)  # seeded
    other = RidgeClassifier(d, layout, RidgeOptions(projection_dim=m), CPU)
    _feed(other, 0, *data[0], seed + 1)
    assert not torch.equal(other.projection, clf.projection)
    with pytest.raises(NotImplementedError, match="projection_dim=0"):
        clf.export_linear(1)


@pytest.mark.parametrize("m", [0, 16])
def test_ridge_accumulated_over_tasks_equals_one_solve_on_all_data(m: int) -> None:
    gen = torch.Generator().manual_seed(4)
    d, lam = 5, 0.5
    layout = ClassLayout.create("class", [2, 2, 2])
    clf = RidgeClassifier(d, layout, RidgeOptions(projection_dim=m, lambdas=[lam]), CPU)
    parts = [(torch.randn(11, d, generator=gen), 2 * t + torch.arange(11) % 2) for t in range(3)]
    for t, (f, y) in enumerate(parts):
        _feed(clf, t, f, y)
    f, y = torch.cat([p[0] for p in parts]).double(), torch.cat([p[1] for p in parts])
    h = torch.relu(f @ clf.projection) if m else f
    onehot = torch.nn.functional.one_hot(y, 6).double()
    once = torch.linalg.solve(h.T @ h + lam * torch.eye(h.shape[1], dtype=torch.float64), h.T @ onehot)
    assert torch.allclose(clf.weight, once, atol=1e-10)
    assert clf.chosen.tolist() == [lam] * 3
    if m == 0:  # no projection: the ridge head is one linear layer on the feature
        weight, bias = clf.export_linear(2)
        x = torch.randn(4, d, generator=gen)
        assert torch.allclose(x @ weight.T + bias, clf.logits(x, 2), atol=1e-5)
    state = clf.state_tensors()
    assert clf.estimate_state_bytes() >= sum(v.numel() * v.element_size() for v in state.values())
    restored = RidgeClassifier(d, layout, RidgeOptions(projection_dim=m, lambdas=[lam]), CPU)
    restored.load_state_tensors(state)
    x = torch.randn(3, d, generator=gen)
    assert torch.equal(restored.logits(x, 2), clf.logits(x, 2))
    with pytest.raises(ValueError, match="projection_dim"):
        RidgeClassifier(d, layout, RidgeOptions(projection_dim=m + 3), CPU).load_state_tensors(state)


def test_ridge_options_are_checked() -> None:
    for bad, message in (({"projection_dim": -1}, "projection_dim"), ({"lambdas": []}, "lambdas"),
                         ({"lambdas": [0.0]}, "lambdas"), ({"fit_fraction": 1.0}, "fit_fraction")):
        with pytest.raises(ValueError, match=message):
            RidgeOptions(**bad).validate()


# ------------------------------------------------------------------------------------------ learners on a tiny ViT
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def tiny(root: Path, *extra: str):
    return load_config("clinc150", for_method([*TINY_VIT_OVERRIDES, f"data.options={{root: {root}}}",
                                               "scenario.num_tasks=2", "scenario.order=natural", "train.epochs=1",
                                               "train.lr=0.01", *extra]))


def _backbone_state(experiment: Experiment) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in experiment.backbone.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [["method=simplecil"], ["method=ranpac", "ridge.projection_dim=64"]])
def test_simplecil_and_ranpac_train_nothing_of_the_backbone(images: Path, extra: list[str]) -> None:
    experiment = Experiment(tiny(images, *extra))
    before = _backbone_state(experiment)
    results = experiment.run()
    assert _same(before, _backbone_state(experiment))
    assert [d["trainable_parameters"] for d in results["diagnostics"]] == [0, 0]
    assert [t["train_s"] for t in results["timings"]] == [0.0, 0.0]  # no training step at all
    assert results["accuracy_matrix"][-1] == [100.0, 100.0]  # coloured classes: separable by frozen features


def test_frozen_with_prototypes_is_simplecil(images: Path) -> None:
    runs = [Experiment(tiny(images, *extra)) for extra in (["method=simplecil"],
                                                           ["method=frozen", "classifier=prototype"])]
    results = [run.run() for run in runs]
    assert results[0]["accuracy_matrix"] == results[1]["accuracy_matrix"]
    assert torch.equal(runs[0].learner.classifier.sums, runs[1].learner.classifier.sums)


def test_aper_adapts_in_task_0_only_and_its_feature_is_the_concatenation(images: Path) -> None:
    experiment = Experiment(tiny(images, "method=aper", "aper.rank=4"))
    learner = experiment.learner
    d = experiment.backbone.feature_dim
    assert learner.classifier.feature_dim == 2 * d
    initial = _backbone_state(experiment)
    experiment.run_task(0)
    after0 = _backbone_state(experiment)
    changed = {k for k in after0 if k not in initial or not torch.equal(initial[k], after0[k])}
    assert changed and all("first_session" in k for k in changed)  # only the branch moved; base weights did not
    assert experiment.state.diagnostics[0]["trainable_parameters"] > 0
    assert not any(p.requires_grad for p in experiment.backbone.parameters())
    experiment.run_task(1)
    assert _same(after0, _backbone_state(experiment))  # bit-identical after the first session
    assert experiment.state.diagnostics[1]["trainable_parameters"] == 0

    adapted = copy.deepcopy(experiment.backbone)  # the branch folded in, and the branch taken out: independently
    pretrained = copy.deepcopy(experiment.backbone)
    for name, layer in [(n, m) for n, m in adapted.named_modules() if isinstance(m, LoRALinear)]:
        with torch.no_grad():
            layer.base.weight[layer.out_slices[0][0]:] += layer.branch("first_session").update().float()
        replace_module(adapted, name, layer.base)
    for name, layer in [(n, m) for n, m in pretrained.named_modules() if isinstance(m, LoRALinear)]:
        replace_module(pretrained, name, layer.base)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    learner.train_mode(False)
    with torch.no_grad():
        expected = torch.cat([pretrained.eval()(x), adapted.eval()(x)], dim=-1)
        assert torch.allclose(learner.features(x), expected, atol=1e-5)
        assert not torch.allclose(expected[:, :d], expected[:, d:], atol=1e-4)
    with pytest.raises(NotImplementedError, match="concatenates"):
        learner.export_parts(1)


@pytest.mark.parametrize("extra", [["method=simplecil"], ["method=aper", "aper.rank=4"],
                                   ["method=ranpac", "ranpac.adapt=true", "ranpac.rank=4",
                                    "ridge.projection_dim=32"],
                                   ["method=inflora", "classifier=ridge", "ridge.projection_dim=32"]])
def test_state_round_trip_gives_identical_predictions(images: Path, extra: list[str]) -> None:
    experiment = Experiment(tiny(images, *extra))
    experiment.run()
    state = experiment.learner.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    fresh = Experiment(tiny(images, *extra))
    fresh.learner.load_state_dict(state)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for learner in (experiment.learner, fresh.learner):
        learner.train_mode(False)
    with torch.no_grad():
        assert torch.equal(experiment.learner.predict(x, 1), fresh.learner.predict(x, 1))
    assert experiment.learner.estimate_state_bytes() >= sum(v.numel() * v.element_size() for v in state.values()
                                                            if v.ndim)


def test_inflora_trains_its_branch_against_the_temporary_head(images: Path) -> None:
    experiment = Experiment(tiny(images, "classifier=prototype"))
    experiment.run_task(0)
    ctx = experiment.context(1)
    learner = experiment.learner
    learner.begin_task(ctx)
    groups = learner.parameter_groups(ctx)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in learner.classifier.head.parameters()}
    assert groups[0]["params"]  # the InfLoRA branch trains


def test_domain_incremental_runs(tmp_path: Path) -> None:
    root = _domains(tmp_path)
    for extra in (["method=simplecil"], ["method=ranpac", "ridge.projection_dim=32"],
                  ["method=aper", "aper.rank=4"]):
        config = load_config("clinc150", for_method([
            *TINY_VIT_OVERRIDES, "data.name=domainnet", f"data.data_dir={root}", "data.transforms=imagenet",
            "data.options={domains: [clipart, real]}", "scenario.kind=domain", "train.epochs=1", *extra]))
        experiment = Experiment(config)
        results = experiment.run()
        assert results["classes_per_task"] == [3, 3]
        assert results["accuracy_matrix"][-1][-1] >= 66.0, extra  # 3 colour classes (measured 100)
        if extra[0] != "method=ranpac":
            assert experiment.learner.classifier.counts.tolist() == [12.0, 12.0, 12.0]  # 6 + 6 over two domains


# ------------------------------------------------------------------------------------------ a tiny BERT
WORDS = {0: "cat sat mat", 1: "dog ran far", 2: "bird flew high", 3: "fish swam deep"}


@pytest.fixture(scope="module")
def text_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from inflora.data.base import ContinualDataset, ListSplit
    from inflora.data.registry import DATASETS, register_dataset

    root = tmp_path_factory.mktemp("text")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "one", "two",
             *sorted({w for s in WORDS.values() for w in s.split()})]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(str(root / "bert"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(root / "bert"))

    def split(count: int, offset: int) -> ListSplit:
        texts, labels, domains = [], [], []
        for domain, prefix in enumerate(("the", "a")):
            for c, words in WORDS.items():
                for i in range(count):
                    extra = ("one", "two")[(i + offset) % 2]
                    texts.append(f"{prefix} {words} {extra}")
                    labels.append(c)
                    domains.append(domain)
        return ListSplit(texts, labels, domains)

    if "ff-text" not in DATASETS:
        register_dataset("ff-text", "test: four intents in two wordings")(
            lambda data_dir: ContinualDataset("ff-text", "text", [f"c{c}" for c in WORDS], split(4, 0), split(2, 1),
                                              domain_names=["the", "a"]))
    return root


@pytest.mark.parametrize(("kind", "extra"), [("class", ["method=aper", "aper.rank=2"]),
                                             ("class", ["method=simplecil"]),
                                             ("domain", ["method=ranpac", "ridge.projection_dim=16"]),
                                             ("domain", ["method=aper", "aper.rank=2"])])
def test_tiny_bert_end_to_end(text_root: Path, kind: str, extra: list[str]) -> None:
    config = load_config("clinc150", ["data.name=ff-text", f"data.data_dir={text_root}",
                                      f"model.backbone=hf:{text_root / 'bert'}", "model.max_length=16",
                                      f"scenario.kind={kind}", "scenario.num_tasks=2", "scenario.order=natural",
                                      "train.epochs=2", "train.lr=0.01", "train.batch_size=8",
                                      "train.progress=false", *extra])
    experiment = Experiment(config)
    results = experiment.run()
    assert results["classes_per_task"] == ([2, 2] if kind == "class" else [4, 4])
    assert len(results["accuracy_matrix"]) == 2 and all(0 <= a <= 100 for a in results["accuracy_matrix"][-1])
    first_session = [d["trainable_parameters"] > 0 for d in results["diagnostics"]]
    assert first_session == ([True, False] if extra[0] == "method=aper" else [False, False])


def test_simplecil_on_normalised_text_features_exports_as_one_linear_layer(text_root: Path, tmp_path: Path) -> None:
    from inflora.export import ExportedModel, export_experiment

    config = load_config("clinc150", ["data.name=ff-text", f"data.data_dir={text_root}", "method=simplecil",
                                      f"model.backbone=hf:{text_root / 'bert'}", "model.max_length=16",
                                      "model.options={normalize: true}", "scenario.num_tasks=2",
                                      "scenario.order=natural", "train.progress=false", "prototype.scale=10"])
    experiment = Experiment(config)
    experiment.run()
    manifest = export_experiment(experiment, tmp_path / "model")  # verified against predict on a probe batch
    assert manifest["num_classes"] == 4
    model = ExportedModel.load(tmp_path / "model")
    inputs, _ = experiment.backbone.collate([("the cat sat mat one", 0), ("a fish swam deep two", 3)])
    experiment.learner.train_mode(False)
    with torch.no_grad():
        assert torch.allclose(model(inputs), experiment.learner.predict(inputs, 1), atol=1e-4)


# ------------------------------------------------------------------------------------------ configuration
def test_a_method_that_is_a_classifier_replaces_the_presets() -> None:
    for method, own in (("simplecil", "prototype"), ("aper", "prototype"), ("ranpac", "ridge")):
        config = load_config("clinc150", [f"method={method}"])  # the preset says classifier: aligned
        assert config.classifier == own
        resolved = to_dict(config)
        assert resolved["classifier"] == own and "aligned" not in resolved and own in resolved
        assert load_config("clinc150", [f"method={method}", f"classifier={own}"]).classifier == own
        with pytest.raises(ConfigError, match=f"is the classifier '{own}'"):
            load_config("clinc150", [f"method={method}", "classifier=aligned"])
        with pytest.raises(ConfigError, match="do not belong"):
            load_config("clinc150", [f"method={method}", "aligned.epochs=2"])
    for own in ("prototype", "ridge"):  # other methods take these classifiers like any other
        assert load_config("clinc150", ["method=inflora", f"classifier={own}"]).classifier == own
    config = load_config("clinc150", ["method=simplecil"])
    config.classifier = "linear"
    with pytest.raises(ConfigError, match="is the classifier 'prototype'"):
        validate(config)


def test_a_learner_refuses_another_classifier(images: Path) -> None:
    from inflora.classifiers import LinearHeads
    from inflora.learners import LearnerSetup, SimpleCILLearner

    experiment = Experiment(tiny(images, "method=simplecil"))
    setup = LearnerSetup(experiment.backbone, LinearHeads(48, experiment.layout, None, CPU), None,
                         experiment.config.train, experiment.runtime, 2, 0)
    with pytest.raises(ValueError, match="is the classifier 'prototype'"):
        SimpleCILLearner(setup)

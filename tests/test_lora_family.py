"""The LoRA-family baselines ``sdlora``, ``olora``, ``clora`` and the generic layer features they use: per-slice
branches and a magnitude shared by many branches. Each method's defining property against a formula computed here,
what trains and what stays frozen, state round trips, tiny end-to-end runs (tiny ViT and tiny BERT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_VIT_OVERRIDES, make_image_folder
from inflora.backbones import TimmBackbone
from inflora.classifiers import ClassLayout
from inflora.classifiers.linear import LinearHeads
from inflora.config import ConfigError, TrainConfig, load_config
from inflora.engine import Experiment
from inflora.learners import LEARNERS, Learner, LearnerSetup, TaskContext
from inflora.learners.clora import self_regularisation
from inflora.learners.olora import orthogonality
from inflora.learners.sdlora import direction_norm
from inflora.lora import LoRALinear
from inflora.runtime import Runtime

METHODS = ["sdlora", "olora", "clora"]
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ helpers
def vit_learner(method: str, tasks: int = 3, **options: object) -> Learner:
    """A learner of ``method`` on a tiny timm ViT (2 blocks, width 48) with per-task linear heads of 2 classes."""
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            embed_dim=48, num_heads=3)
    layout = ClassLayout.create("class", [2] * tasks)
    classifier = LinearHeads(backbone.feature_dim, layout, None, CPU)
    cls = LEARNERS.get(method)
    opts = cls.options_type(**options)
    opts.validate()
    return cls(LearnerSetup(backbone, classifier, opts, TrainConfig(), Runtime(CPU), tasks, 0))


def context(learner: Learner, task: int) -> TaskContext:
    return TaskContext(task, learner.num_tasks, [2 * task, 2 * task + 1], 0, learner.runtime,
                       lambda limit=None, phase="design": iter(()), lambda: iter(()))


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def train(learner: Learner, ctx: TaskContext, steps: int = 3, lr: float = 0.05) -> None:
    """A few SGD steps of the learner's own step on random images, as the training loop runs them."""
    groups = learner.parameter_groups(ctx)
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.SGD(params, lr=lr)
    x = images(8, seed=10 + ctx.index)
    y = torch.tensor(ctx.classes * 4)
    learner.train_mode(True)
    for _ in range(steps):
        loss = learner.training_step(x, y, ctx).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for p in params:
        p.requires_grad_(False)


@torch.no_grad()
def randomise(learner: Learner, task: int, seed: int) -> None:
    """Give task ``task``'s pairs random (non-zero) factors."""
    gen = torch.Generator().manual_seed(seed)
    for projection in learner.projections:
        branch = projection.branch(task)
        branch.down.copy_(torch.randn(branch.down.shape, generator=gen) * 0.3)
        branch.up.copy_(torch.randn(branch.up.shape, generator=gen) * 0.3)


def factors(learner: Learner, task: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(p.branch(task).down.detach().clone(), p.branch(task).up.detach().clone()) for p in learner.projections]


def run_tasks(learner: Learner, tasks: int, *, randomised: bool = True) -> None:
    for t in range(tasks):
        learner.begin_task(context(learner, t))
        if randomised:
            randomise(learner, t, seed=100 + t)
        learner.end_task(context(learner, t))


def predict(learner: Learner, upto: int) -> torch.Tensor:
    learner.train_mode(False)
    with torch.no_grad():
        return learner.predict(images(), upto)


# ------------------------------------------------------------------------------------------ generic layer
def test_branches_on_a_subset_of_slices_and_a_shared_magnitude() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 9)
    layer = LoRALinear(base, [(0, 3), (6, 9)])  # q and v thirds of a fused qkv
    x = torch.randn(4, 6)
    plain = base(x).detach()
    alpha = nn.Parameter(torch.tensor(0.7))
    q = layer.add_branch("q", torch.randn(2, 6), torch.randn(3, 2), scale=alpha, slices=[0])
    v = layer.add_branch("v", torch.randn(2, 6), torch.randn(3, 2), scale=alpha, slices=[1])
    with pytest.raises(ValueError, match=r"up-projection of shape \(6, 2\), expected \(3, 2\)"):
        layer.add_branch("bad", torch.randn(2, 6), torch.randn(6, 2), slices=[0])
    with pytest.raises(ValueError, match="sorted distinct indices"):
        layer.add_branch("bad", torch.randn(2, 6), slices=[2])
    out = layer(x)
    assert torch.equal(out[:, 3:6], plain[:, 3:6])  # k untouched
    assert torch.allclose(out[:, :3], plain[:, :3] + 0.7 * x @ q.down.T @ q.up.T, atol=1e-6)
    assert torch.allclose(out[:, 6:], plain[:, 6:] + 0.7 * x @ v.down.T @ v.up.T, atol=1e-6)
    out.sum().backward()
    expected = (x @ q.down.T @ q.up.T).sum() + (x @ v.down.T @ v.up.T).sum()  # one parameter, both branches' grads
    assert torch.allclose(alpha.grad, expected.detach(), atol=1e-5)
    with torch.no_grad():
        layer.merge("q")
        assert torch.allclose(layer(x), out, atol=1e-6) and layer.merged["q"].slices == (0,)
        layer.unmerge("q")
        assert torch.allclose(layer.base.weight, base.weight) and torch.allclose(layer(x), out, atol=1e-6)


def test_projections_follow_the_query_and_value_presets() -> None:
    learner = vit_learner("olora", rank=2)
    assert [p.name for p in learner.projections] == ["model.blocks.0.attn.qkv[0]", "model.blocks.0.attn.qkv[1]",
                                                     "model.blocks.1.attn.qkv[0]", "model.blocks.1.attn.qkv[1]"]
    assert learner.projections[0].layer.out_slices == [(0, 48), (96, 144)]  # q and v, not k
    learner.begin_task(context(learner, 0))
    q, v = (p.branch(0) for p in learner.projections[:2])
    assert q.down.shape == v.down.shape == (2, 48) and not torch.equal(q.down, v.down)  # q and v: separate A
    assert float(q.up.detach().abs().sum()) == 0.0  # zero B
    assert float(q.down.detach().abs().max()) <= 1 / 48 ** 0.5  # Kaiming-uniform A


# ------------------------------------------------------------------------------------------ SD-LoRA
def test_sdlora_freezes_normalised_directions_and_trains_their_magnitudes() -> None:
    learner = vit_learner("sdlora", rank=3)
    ctx0 = context(learner, 0)
    learner.begin_task(ctx0)
    train(learner, ctx0)
    learner.end_task(ctx0)
    raw = factors(learner, 0)
    trained_alpha = float(learner.magnitudes[0])
    assert trained_alpha != 0.8 and learner.diagnostics()["magnitudes"] == [trained_alpha]

    ctx1 = context(learner, 1)
    learner.begin_task(ctx1)
    for projection, (down, up) in zip(learner.projections, raw, strict=True):
        branch = projection.branch(0)
        assert not isinstance(branch.down, nn.Parameter) and not isinstance(branch.up, nn.Parameter)
        assert torch.equal(branch.down, down)
        norm = up.double().pow(2).sum().sqrt() * down.double().pow(2).sum().sqrt()
        assert torch.allclose(branch.up.double(), up.double() / norm, rtol=1e-6, atol=0)
    assert [float(m) for m in learner.magnitudes] == [pytest.approx(0.8), pytest.approx(0.8)]  # reference: restart
    groups = learner.parameter_groups(ctx1)
    current = {id(p) for _, b in learner.current() for p in (b.down, b.up)}
    assert {id(p) for p in groups[0]["params"]} == current | {id(m) for m in learner.magnitudes}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in learner.classifier.heads[1].parameters()}

    frozen = factors(learner, 0)
    train(learner, ctx1)
    learner.end_task(ctx1)
    for (down, up), (down_after, up_after) in zip(frozen, factors(learner, 0), strict=True):
        assert torch.equal(down, down_after) and torch.equal(up, up_after)  # bit-identical directions
    assert float(learner.magnitudes[0]) != pytest.approx(0.8)  # ... only their magnitude moved
    assert any(float(b.up.abs().sum()) > 0 for _, b in learner.current())


def test_sdlora_magnitudes_go_on_without_reset() -> None:
    learner = vit_learner("sdlora", rank=2, reset_magnitudes=False, magnitude_init=0.5)
    ctx0 = context(learner, 0)
    learner.begin_task(ctx0)
    train(learner, ctx0)
    learner.end_task(ctx0)
    trained = float(learner.magnitudes[0])
    learner.begin_task(context(learner, 1))
    assert float(learner.magnitudes[0]) == trained != 0.5 and float(learner.magnitudes[1]) == 0.5


@pytest.mark.parametrize("normalize", ["factors", "product"])
def test_sdlora_layer_output_is_the_decoupled_sum(normalize: str) -> None:
    learner = vit_learner("sdlora", rank=3, normalize=normalize)
    raw = []
    for t in range(3):
        learner.begin_task(context(learner, t))
        randomise(learner, t, seed=100 + t)
        raw.append(factors(learner, t))
        if t < 2:
            learner.end_task(context(learner, t))
    alphas = [0.3, -1.1, 0.6]
    with torch.no_grad():
        for m, a in zip(learner.magnitudes, alphas, strict=True):
            m.fill_(a)
    layer = learner.projections[0].layer
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, plain = layer(x), layer.base(x)
    for slot, (start, stop) in enumerate([(0, 48), (96, 144)]):
        expected = plain[..., start:stop].double()
        for t in range(3):
            down, up = (f.double() for f in raw[t][slot])
            update = up @ down
            if t < 2:  # finished: its direction, normalised as the option says
                norm = torch.linalg.matrix_norm(up) * torch.linalg.matrix_norm(down) if normalize == "factors" \
                    else torch.linalg.matrix_norm(update)
                update = update / norm
            expected = expected + alphas[t] * x.double() @ update.T
        assert torch.allclose(out[..., start:stop].double(), expected, atol=1e-5)
    assert torch.equal(out[..., 48:96], plain[..., 48:96])
    down, up = raw[0][0]
    assert torch.allclose(direction_norm(down, up, "product"), torch.linalg.matrix_norm(up.double() @ down.double()))


def test_sdlora_export_folds_every_direction_with_its_magnitude() -> None:
    learner = vit_learner("sdlora", rank=3)
    run_tasks(learner, 2)
    learner.begin_task(context(learner, 2))
    randomise(learner, 2, seed=7)
    with pytest.raises(RuntimeError, match="middle of a task"):
        learner.export_parts(2)
    learner.end_task(context(learner, 2))
    with torch.no_grad():
        learner.magnitudes[1].fill_(-0.4)
    backbone, weight, bias = learner.export_parts(2)
    assert not any(isinstance(m, LoRALinear) for m in backbone.modules())
    merged = torch.nn.functional.linear(backbone(images()), weight, bias)
    assert torch.allclose(merged, predict(learner, 2), atol=1e-5)


# ------------------------------------------------------------------------------------------ O-LoRA
def test_olora_penalty_is_zero_for_orthogonal_factors() -> None:
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(0)))
    old, new = q[:, :4].T.float(), q[:, 4:7].T.float()
    for squared in (False, True):
        assert float(orthogonality([old], [new], squared)) < 1e-5
        assert float(orthogonality([old], [new + old[:3]], squared)) > 0.1
        assert float(orthogonality([None], [new + old[:3]], squared)) == 0.0  # no earlier task: nothing


@pytest.mark.parametrize("squared", [False, True])
def test_olora_penalty_equals_the_formula(squared: bool) -> None:
    learner = vit_learner("olora", rank=3, squared=squared, lambda2=0.3)
    run_tasks(learner, 2)
    ctx = context(learner, 2)
    learner.begin_task(ctx)
    randomise(learner, 2, seed=5)
    state = learner.state_dict()
    ortho, norms = (p.detach() for p in learner.penalties())
    want_ortho, want_norms = 0.0, 0.0
    for i, projection in enumerate(learner.projections):
        new = projection.branch(2).down.detach().double()
        up = projection.branch(2).up.detach().double()
        for t in range(2):
            old = state[f"lora.{i}.{t}.down"].double()
            for j in range(old.shape[0]):
                for k in range(new.shape[0]):
                    dot = float(old[j] @ new[k])
                    want_ortho += dot * dot if squared else abs(dot)
        for f in (new, up):
            sq = float((f * f).sum())
            want_norms += sq if squared else sq ** 0.5
    assert float(ortho) == pytest.approx(want_ortho, rel=1e-5)
    assert float(norms) == pytest.approx(want_norms, rel=1e-5)
    out = learner.training_step(images(), torch.tensor(ctx.classes * 3), ctx)
    assert out.logs["orthogonality"] == pytest.approx(want_ortho, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(out.logs["ce"] + learner.lambda1 * want_ortho
                                                     + learner.lambda2 * want_norms, rel=1e-5)


def test_olora_gradient_step_on_the_penalty_pushes_towards_orthogonality() -> None:
    learner = vit_learner("olora", rank=3)
    run_tasks(learner, 1)
    ctx = context(learner, 1)
    learner.begin_task(ctx)
    downs = [b.down for _, b in learner.current()]
    before, _ = learner.penalties()
    before.backward()
    assert all(d.grad is not None and float(d.grad.abs().sum()) > 0 for d in downs)
    with torch.no_grad():
        for d in downs:
            d -= 1e-3 * d.grad
    after, _ = learner.penalties()
    assert float(after.detach()) < float(before.detach())


@pytest.mark.parametrize("method", ["olora", "clora"])
def test_penalty_learners_train_the_new_pair_and_keep_old_ones_merged(method: str) -> None:
    learner = vit_learner(method, rank=2)
    ctx0 = context(learner, 0)
    learner.begin_task(ctx0)
    train(learner, ctx0)
    learner.end_task(ctx0)
    layer = learner.projections[0].layer
    assert not layer.branches and set(layer.merged) == {"0_0", "0_1"}
    old = factors(learner, 0)
    ctx1 = context(learner, 1)
    learner.begin_task(ctx1)
    groups = learner.parameter_groups(ctx1)
    current = {id(p) for _, b in learner.current() for p in (b.down, b.up)}
    assert {id(p) for p in groups[0]["params"]} == current
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in learner.classifier.heads[1].parameters()}
    scale = 32.0 / 2 if method == "olora" else 1.0
    assert all(b.scale == scale for _, b in learner.current())
    train(learner, ctx1)
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(old, factors(learner, 0),
                                                                                 strict=True))
    assert any(float(b.up.abs().sum()) > 0 for _, b in learner.current())


# ------------------------------------------------------------------------------------------ C-LoRA
def test_clora_penalty_is_zero_at_the_first_task_then_equals_the_formula() -> None:
    learner = vit_learner("clora", rank=3, scale=0.5)
    learner.begin_task(context(learner, 0))
    randomise(learner, 0, seed=1)
    assert float(learner.penalty().detach()) == 0.0  # no past update at t = 0, whatever the new pair
    learner.end_task(context(learner, 0))
    learner.begin_task(context(learner, 1))
    randomise(learner, 1, seed=2)
    state = learner.state_dict()
    want = 0.0
    for i, projection in enumerate(learner.projections):
        past = 0.5 * state[f"lora.{i}.0.up"].double() @ state[f"lora.{i}.0.down"].double()
        branch = projection.branch(1)
        new = 0.5 * branch.up.detach().double() @ branch.down.detach().double()
        want += float(((past * new) ** 2).sum())
    assert want > 0 and float(learner.penalty().detach()) == pytest.approx(want, rel=1e-5)
    y = torch.tensor(context(learner, 1).classes * 3)
    out = learner.training_step(images(), y, context(learner, 1))
    assert out.logs["penalty"] == pytest.approx(want, rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(out.logs["ce"] + learner.lam * want, rel=1e-5)


def test_clora_penalty_is_zero_when_the_supports_are_disjoint() -> None:
    gen = torch.Generator().manual_seed(0)
    past = torch.zeros(6, 8)
    past[:3] = torch.randn(3, 8, generator=gen)  # earlier tasks changed rows 0-2 only
    down, up = torch.randn(2, 8, generator=gen), torch.randn(6, 2, generator=gen)
    up[:3] = 0.0  # the new update writes rows 3-5 only
    assert float(self_regularisation([past], [up], [down], 1.0)) == 0.0
    cols = torch.zeros(6, 8)
    cols[:, :4] = torch.randn(6, 4, generator=gen)  # ... or columns 0-3 against a new update on columns 4-7
    down_cols = torch.randn(2, 8, generator=gen)
    down_cols[:, :4] = 0.0
    assert float(self_regularisation([cols], [torch.randn(6, 2, generator=gen)], [down_cols], 2.0)) == 0.0
    assert float(self_regularisation([past], [torch.randn(6, 2, generator=gen)], [down], 1.0)) > 0.0


# ------------------------------------------------------------------------------------------ state, options
@pytest.mark.parametrize("method", METHODS)
def test_state_round_trip_gives_identical_predictions(method: str) -> None:
    learner = vit_learner(method, rank=3)
    run_tasks(learner, 2)
    if method == "sdlora":
        with torch.no_grad():
            learner.magnitudes[0].fill_(1.7)
    state = learner.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    fresh = vit_learner(method, rank=3)
    fresh.load_state_dict(state)
    assert torch.equal(predict(fresh, 1), predict(learner, 1))
    for one in (learner, fresh):  # and the next task starts from the same place
        torch.manual_seed(2)  # the engine seeds every task's start (the new head's initialisation)
        one.begin_task(context(one, 2))
        randomise(one, 2, seed=9)
    assert torch.equal(predict(fresh, 2), predict(learner, 2))
    with pytest.raises(RuntimeError, match="fresh"):
        fresh.load_state_dict(state)


@pytest.mark.parametrize(("override", "message"), [
    ("sdlora.normalize=both", "normalize"),
    ("olora.lambda1=-1", "lambda1 must be >= 0"),
    ("clora.scale=0", "scale must be > 0"),
    ("clora.rank=0", "rank must be >= 1"),
])
def test_bad_options_are_explained(override: str, message: str) -> None:
    method = override.split(".", 1)[0]
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config("clinc150", [f"method={method}", override])


def test_rank_wider_than_the_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 64 exceeds the input width 48"):
        vit_learner("sdlora", rank=64)


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("method", METHODS)
def test_tiny_vit_run_and_export(image_root: Path, tmp_path: Path, method: str) -> None:
    from inflora.export import ExportedModel, export_experiment

    overrides = [o for o in TINY_VIT_OVERRIDES if not o.startswith("inflora.")]
    config = load_config("clinc150", [*overrides, f"data.options={{root: {image_root}}}", "scenario.num_tasks=2",
                                      "train.epochs=2", "train.lr=0.01", "classifier=linear", f"method={method}",
                                      f"{method}.rank=3"])
    experiment = Experiment(config)
    results = experiment.run()
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    last = results["diagnostics"][-1]
    expected_logs = {"sdlora": set(), "olora": {"ce", "orthogonality", "norms"}, "clora": {"ce", "penalty"}}[method]
    assert set(last.get("last_step", {})) == expected_logs
    if method == "sdlora":
        assert len(last["magnitudes"]) == 2
    else:
        assert last["last_step"][next(iter(expected_logs - {"ce", "norms"}))] > 0  # the penalty is live at t = 1
    export_experiment(experiment, tmp_path / "model")
    model = ExportedModel.load(tmp_path / "model")
    experiment.learner.train_mode(False)
    with torch.no_grad():
        assert torch.allclose(model(images()), experiment.learner.predict(images(), 1), atol=1e-4)


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "green", "blue", "gold", "cat", "dog", "owl", "fox"]


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BERT saved as a local model folder and a 4-class text dataset (one keyword per class)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("text")
    model_dir = root / "bert"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("test", 4)):
        rows = []
        for label, word in enumerate(VOCAB[5:9]):
            for _ in range(n):
                filler = [VOCAB[9 + int(i)] for i in torch.randint(0, 4, (3,), generator=gen)]
                rows.append({"text": " ".join([word, *filler]), "label": f"c{label}"})
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, model_dir


@pytest.mark.parametrize("method", METHODS)
def test_tiny_bert_run(text_setup: tuple[Path, Path], method: str) -> None:
    root, model_dir = text_setup
    config = load_config("clinc150", [
        f"model.backbone=hf:{model_dir}", "model.max_length=16", "data.name=text-files", f"data.data_dir={root}",
        "data.options={train: train.jsonl, test: test.jsonl}", "scenario.num_tasks=2", "scenario.order=natural",
        "train.epochs=1", "train.batch_size=8", "train.lr=0.01", "train.progress=false", "classifier=linear",
        f"method={method}", f"{method}.rank=2"])
    experiment = Experiment(config)
    names = [p.name for p in experiment.learner.projections]
    assert len(names) == 4 and all(n.endswith(("attention.self.query", "attention.self.value")) for n in names)
    results = experiment.run()
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    logs = [v for d in results["diagnostics"] for v in d.get("last_step", {}).values()]
    assert all(torch.isfinite(torch.tensor(v)) for v in logs)
    assert all(float(p.branch(t).up.detach().abs().sum()) > 0 for p in experiment.learner.projections
               for t in range(2))  # every task's pair trained on every projection

"""Prompt baselines (L2P, DualPrompt, CODA-Prompt) on a tiny timm ViT and a tiny BERT, CPU: what trains, the query
pass, key matching and the pull loss, CODA's components, state round trip, export refusal, options."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_bert
from inflora.backbones import HFTextBackbone, TimmBackbone
from inflora.classifiers import ClassLayout, LinearHeads
from inflora.config import ConfigError, TrainConfig, load_config
from inflora.learners import LearnerSetup, TaskContext
from inflora.learners.prompts import (
    CodaPromptLearner,
    CodaPromptOptions,
    DualPromptLearner,
    DualPromptOptions,
    L2PLearner,
    L2POptions,
    PromptLearner,
)
from inflora.learners.prompts.base import apply_recipe
from inflora.learners.prompts.codaprompt import component_weights
from inflora.learners.prompts.matching import ortho_penalty, prefix_halves, pull_loss
from inflora.runtime import Runtime

CPU = torch.device("cpu")
TINY: dict[str, dict[str, Any]] = {
    "l2p": {"pool": 6, "length": 4, "top_k": 2, "blocks": [0, 1]},
    "dualprompt": {"g_length": 2, "g_blocks": [0], "e_length": 4, "e_blocks": [1]},
    "codaprompt": {"pool": 8, "length": 4, "blocks": [0, 1]},
}
KINDS = {"l2p": (L2PLearner, L2POptions), "dualprompt": (DualPromptLearner, DualPromptOptions),
         "codaprompt": (CodaPromptLearner, CodaPromptOptions)}
METHODS = list(KINDS)


def backbone(modality: str) -> nn.Module:
    if modality == "text":
        return HFTextBackbone.from_model(tiny_bert(), None)
    torch.manual_seed(0)
    return TimmBackbone("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=48,
                        num_heads=3)


def build(method: str, modality: str = "image", tasks: int = 2, bb: nn.Module | None = None,
          **options: Any) -> PromptLearner:
    bb = backbone(modality) if bb is None else bb
    cls, opts = KINDS[method]
    classifier = LinearHeads(bb.feature_dim, ClassLayout.create("class", [2] * tasks), None, CPU)
    setup = LearnerSetup(bb, classifier, opts(**{**TINY[method], **options}), TrainConfig(), Runtime(CPU), tasks, 0)
    return cls(setup)


def text(seed: int = 1, lengths: tuple[int, ...] = (7, 4, 9, 5), pad: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with [CLS] = 2 first; ``pad`` extra positions of random ids that the mask hides."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + pad
    ids = torch.randint(5, 60, (len(lengths), width), generator=torch.Generator().manual_seed(99))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, 60, (n,), generator=g)
        ids[i, 0] = 2
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def inputs(modality: str, seed: int = 1) -> Any:
    if modality == "text":
        return text(seed)
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def context(learner: PromptLearner, task: int) -> TaskContext:
    return TaskContext(task, learner.num_tasks, [2 * task, 2 * task + 1], 0, learner.runtime,
                       lambda *a, **k: iter(()), lambda: iter(()))


def train(learner: PromptLearner, task: int, modality: str = "image", steps: int = 3, lr: float = 0.05,
          begin: bool = True) -> list[nn.Parameter]:
    """One task as the training loop runs it (Adam over the learner's groups); returns the trained parameters."""
    ctx = context(learner, task)
    if begin:
        torch.manual_seed(task)
        learner.begin_task(ctx)
    groups = learner.parameter_groups(ctx)
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam([{"params": g["params"], "lr": lr} for g in groups])
    learner.train_mode(True)
    for step in range(steps):
        x, y = inputs(modality, seed=10 * task + step), torch.tensor([0, 1, 0, 1]) + 2 * task
        with torch.enable_grad():
            loss = learner.training_step(x, y, ctx).loss
            optimiser.zero_grad()
            loss.backward()
        optimiser.step()
    for p in params:
        p.requires_grad_(False)
    learner.end_task(ctx)
    learner.train_mode(False)
    return params


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def plain(bb: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return bb(**x) if isinstance(x, dict) else bb(x)


# ------------------------------------------------------------------------------------------ what trains
@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("method", METHODS)
def test_only_prompts_keys_attention_vectors_and_heads_train(method: str, modality: str) -> None:
    learner = build(method, modality)
    before = snapshot(learner.backbone)
    train(learner, 0, modality)
    store0, head0 = snapshot(learner.store), snapshot(learner.classifier.heads[0])
    trained = {id(p) for p in train(learner, 1, modality)}
    expected = {"l2p": lambda n: True, "dualprompt": lambda n: n.startswith("g") or n.endswith("1"),
                "codaprompt": lambda n: n.endswith("_t1")}[method]
    names = {n for n, p in learner.store.items() if id(p) in trained}
    assert names == {n for n in learner.store if expected(n)}
    assert {id(p) for p in learner.classifier.heads[1].parameters()} <= trained
    for name, value in store0.items():
        same = torch.equal(learner.store[name], value)
        assert same == (name not in names), name  # trained ones moved, the others are untouched
    assert all(torch.equal(v, head0[k]) for k, v in learner.classifier.heads[0].state_dict().items())
    after = snapshot(learner.backbone)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in learner.backbone.parameters())


# ------------------------------------------------------------------------------------------ the query pass
@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("method", METHODS)
def test_query_pass_is_prompt_free_and_without_gradients(method: str, modality: str) -> None:
    bb = backbone(modality)
    reference = copy.deepcopy(bb).eval()
    learner = build(method, modality, bb=bb)
    train(learner, 0, modality, steps=1)
    x = inputs(modality)
    learner.train_mode(True)
    with torch.enable_grad():
        query = learner.query(x)
    assert not query.requires_grad and query.grad_fn is None
    assert torch.equal(query, plain(reference, x))  # the plain frozen model, bit for bit
    with torch.no_grad():
        for p in learner.store.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(learner.query(x), query)  # prompts never enter the query
    with torch.no_grad():
        assert not torch.allclose(learner.features(x), query, atol=1e-4)  # the chosen prompts change the features


@pytest.mark.parametrize("modality", ["image", "text"])
@torch.no_grad()
def test_no_prompt_leaves_features_unchanged_but_a_zero_prefix_does_not(modality: str) -> None:
    learner = build("l2p", modality)
    x = inputs(modality)
    query, width = learner.query(x), learner.width
    empty = torch.zeros(0, width)
    assert torch.allclose(learner.prompted(x, prefixes={0: (empty, empty)}), query, atol=1e-5)
    assert torch.allclose(learner.prompted(x, prompts=torch.zeros(4, 0, learner.seam.dim)), query, atol=1e-5)
    rows = torch.rand(3, width)
    assert torch.allclose(learner.prompted(x, prefixes={0: (rows, rows, torch.zeros(3, dtype=torch.bool))}), query,
                          atol=1e-5)  # masked prefix positions
    zero = torch.zeros(3, width)  # exp(q . 0) = 1 takes softmax weight from the real tokens
    assert not torch.allclose(learner.prompted(x, prefixes={0: (zero, zero)}), query, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_text_padding_never_becomes_a_query(method: str) -> None:
    learner = build(method, "text")
    train(learner, 0, "text", steps=1)
    x, padded = text(), text(pad=6)
    assert padded["input_ids"].shape[1] == x["input_ids"].shape[1] + 6
    with torch.no_grad():
        query = learner.query(padded)
        hidden = learner.backbone.model(**x).last_hidden_state
        mask = x["attention_mask"].unsqueeze(-1).float()
        assert torch.allclose(query, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5)  # masked mean, real tokens
        assert torch.allclose(learner.predict(padded, 0), learner.predict(x, 0), atol=1e-5)
        if method == "l2p":
            chosen = [idx for _, idx in learner.choose(query)]
            assert all(torch.equal(a, b) for a, (_, b) in zip(chosen, learner.choose(learner.query(x)), strict=True))


# ------------------------------------------------------------------------------------------ keys and the pull loss
def test_pull_loss_matches_its_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(4, 6, generator=g) * 2 - 1
    chosen = torch.randint(0, 6, (4, 2), generator=g)
    own = sum(1 - sim[b, chosen[b, j]] for b in range(4) for j in range(2)) / 4
    reference = sum(1 - sim[c, chosen[b, j]] for b in range(4) for j in range(2) for c in range(4))
    assert torch.allclose(pull_loss(sim, chosen, "own"), own)
    assert torch.allclose(pull_loss(sim, chosen, "reference"), reference)
    task = torch.full((4, 1), 3)  # DualPrompt: every sample pulls the task's key; the reference is B x the sum
    assert torch.allclose(pull_loss(sim, task, "reference"), 4 * (1 - sim[:, 3]).sum())


@pytest.mark.parametrize(("method", "pull"), [("l2p", "reference"), ("l2p", "own"), ("dualprompt", "reference"),
                                              ("dualprompt", "own")])
def test_pull_loss_draws_the_selected_keys_to_their_queries(method: str, pull: str) -> None:
    learner = build(method, pull=pull, **({"e_pool": 3} if method == "dualprompt" else {}))
    queries = torch.cat([learner.query(inputs("image", seed=s)) for s in range(3)])  # the task's batches

    def closeness() -> torch.Tensor:
        if method == "l2p":
            keys = F.normalize(learner.store["b0_keys"], dim=-1)
            return (F.normalize(queries, dim=-1) @ keys.T).gather(1, chosen).mean()
        return (F.normalize(queries, dim=-1) @ F.normalize(learner.store["e1_key0"], dim=0)).mean()

    chosen = learner.choose(queries)[0][1] if method == "l2p" else None
    start, untouched = closeness(), learner.store["e1_key2"].clone() if method == "dualprompt" else None
    train(learner, 0, steps=3, lr=0.05)
    assert closeness() > start + 1e-3
    if untouched is not None:
        assert torch.equal(learner.store["e1_key2"], untouched)  # another task's key is not pulled


@torch.no_grad()
def test_l2p_test_time_choice_is_top_k_by_cosine_without_task_identity() -> None:
    learner = build("l2p")
    train(learner, 0)
    train(learner, 1)
    x = inputs("image", seed=7)
    q = F.normalize(plain(learner.backbone, x), dim=-1)
    prefixes = {}
    for block in (0, 1):
        idx = (q @ F.normalize(learner.store[f"b{block}_keys"], dim=-1).T).topk(2, dim=-1).indices
        rows = learner.store[f"b{block}_prompts"][idx]  # (B, 2, L, D): 2 x L/2 keys, 2 x L/2 values
        half = rows.shape[2] // 2
        prefixes[block] = (rows[:, :, :half].flatten(1, 2), rows[:, :, half:].flatten(1, 2))
    expected = learner.classifier.logits(learner.seam.features(x, prefixes=prefixes), 1)
    assert torch.allclose(learner.predict(x, 1), expected, atol=1e-5)
    learner.current_task, learner.in_task = 0, True  # whatever task the learner believes it is in
    assert torch.allclose(learner.predict(x, 1), expected, atol=1e-5)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_l2p_prompt_mode_inserts_the_chosen_prompts_as_tokens(modality: str) -> None:
    learner = build("l2p", modality, mode="prompt", length=3)
    assert set(learner.store) == {"input_keys", "input_prompts"}
    train(learner, 0, modality)
    x = inputs(modality, seed=7)
    with torch.no_grad():
        q = F.normalize(learner.query(x), dim=-1)
        idx = (q @ F.normalize(learner.store["input_keys"], dim=-1).T).topk(2, dim=-1).indices
        prompts = learner.store["input_prompts"][idx].flatten(1, 2)  # (B, 2 x 3, D) tokens after [CLS]
        tokens = learner.seam.run_blocks(learner.seam.prepend(learner.seam.embed(x), prompts))
        expected = learner.classifier.logits(learner.seam.pool(tokens, skip=6), 0)  # prompts not pooled
        assert torch.allclose(learner.predict(x, 0), expected, atol=1e-5)
        assert not torch.allclose(learner.features(x), learner.query(x), atol=1e-4)


@pytest.mark.parametrize("select", ["all", "seen"])
@torch.no_grad()
def test_dualprompt_test_time_e_prompt_is_the_best_matching_key(select: str) -> None:
    learner = build("dualprompt", e_pool=3, e_select=select)
    train(learner, 0)
    x = inputs("image", seed=7)
    q = plain(learner.backbone, x)
    for i in range(3):  # sample i matches key i exactly: keys 1, 2 are untrained yet
        learner.store[f"e1_key{i}"].copy_(q[i])
    idx = (F.normalize(q, dim=-1) @ F.normalize(torch.stack([q[0], q[1], q[2]]), dim=-1).T).argmax(-1)
    if select == "seen":
        idx = torch.zeros_like(idx)  # only task 0's key is a candidate after task 0
    assert (select == "seen") or set(idx.tolist()) == {0, 1, 2}
    e = torch.stack([learner.store[f"e1_prompt{i}"] for i in range(3)])[idx]
    g = learner.store["g0"]
    prefixes = {0: (g[:1], g[1:]), 1: (e[:, :2], e[:, 2:])}
    expected = learner.classifier.logits(learner.seam.features(x, prefixes=prefixes), 0)
    assert torch.allclose(learner.predict(x, 0), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ CODA-Prompt
def test_coda_old_components_stay_fixed_and_new_ones_start_orthogonal_to_them() -> None:
    learner = build("codaprompt")
    train(learner, 0)
    old = {n: p.clone() for n, p in learner.store.items()}
    torch.manual_seed(1)
    learner.begin_task(context(learner, 1))
    for block in (0, 1):
        for kind in ("keys", "attention", "prompts"):
            a = learner.store[f"b{block}_{kind}_t0"].flatten(1).double()
            b = learner.store[f"b{block}_{kind}_t1"].flatten(1).double()
            assert not torch.allclose(a @ a.T, torch.eye(4, dtype=a.dtype), atol=1e-3)  # trained: not orthonormal
            assert torch.allclose(b @ b.T, torch.eye(4, dtype=b.dtype), atol=1e-5)
            assert (b @ a.T).abs().max() < 1e-5
    fresh = {n: p.clone() for n, p in learner.store.items() if n.endswith("_t1")}
    train(learner, 1, begin=False)
    assert all(torch.equal(learner.store[n], v) for n, v in old.items())
    assert all(not torch.equal(learner.store[n], v) for n, v in fresh.items())


@torch.no_grad()
def test_coda_prompt_is_the_query_weighted_sum_of_the_components_seen() -> None:
    learner = build("codaprompt")
    train(learner, 0)
    train(learner, 1)
    x = inputs("image", seed=7)
    q = plain(learner.backbone, x)
    for upto in (0, 1):
        prefixes = {}
        for block in (0, 1):
            k, a, p = (torch.cat([learner.store[f"b{block}_{kind}_t{t}"] for t in range(upto + 1)])
                       for kind in ("keys", "attention", "prompts"))
            alpha = F.cosine_similarity(q[:, None, :] * a[None], k[None], dim=-1)  # (B, M)
            assert torch.allclose(component_weights(q, k, a), alpha, atol=1e-6)
            mixed = (alpha[:, :, None, None] * p[None]).sum(1)
            prefixes[block] = (mixed[:, :2], mixed[:, 2:])
        expected = learner.classifier.logits(learner.seam.features(x, prefixes=prefixes), upto)
        assert torch.allclose(learner.predict(x, upto), expected, atol=1e-5)


def test_orthogonality_penalty() -> None:
    rows = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64)).Q.T
    assert float(ortho_penalty(rows)) < 1e-28
    m = torch.randn(3, 5)
    expected = sum((float(m[i] @ m[j]) - (i == j)) ** 2 for i in range(3) for j in range(3)) / 9
    assert float(ortho_penalty(m)) == pytest.approx(expected, rel=1e-5)
    learner = build("codaprompt", ortho=0.5)
    ctx = context(learner, 0)
    learner.begin_task(ctx)
    for p in learner.trainable(ctx):
        with torch.no_grad():
            p.mul_(2.0)  # no longer unit rows: a penalty to pay
    y = torch.tensor([0, 1, 0, 1])
    out = learner.training_step(inputs("image"), y, ctx)
    penalty = sum(ortho_penalty(learner.store[f"b{b}_{k}_t0"].flatten(1)) for b in (0, 1)
                  for k in ("keys", "attention", "prompts"))
    assert out.logs["ortho"] == pytest.approx(float(penalty), rel=1e-5)
    assert float(out.loss) == pytest.approx(out.logs["ce"] + 0.5 * out.logs["ortho"], rel=1e-5)


# ------------------------------------------------------------------------------------------ state, export
@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("method", METHODS)
def test_state_round_trip_and_resume(method: str, modality: str) -> None:
    learner = build(method, modality)
    train(learner, 0, modality)
    state = learner.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    train(learner, 1, modality)
    resumed = build(method, modality)
    resumed.load_state_dict(state)
    assert resumed.state_dict().keys() == state.keys()
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in state.items())
    train(resumed, 1, modality)  # the resumed run repeats the uninterrupted one
    x = inputs(modality, seed=5)
    with torch.no_grad():
        assert torch.equal(resumed.predict(x, 1), learner.predict(x, 1))
    with pytest.raises(RuntimeError, match="freshly built"):
        resumed.load_state_dict(state)
    name = next(k for k in state if k.startswith("prompts."))
    for broken, message in (({**state, name: torch.zeros(1)}, "shape"),
                            ({k: v for k, v in state.items() if k != name}, "missing")):
        with pytest.raises(ValueError, match=message):
            build(method, modality).load_state_dict(broken)


@pytest.mark.parametrize("method", METHODS)
def test_export_is_refused_with_the_reason(method: str) -> None:
    learner = build(method)
    train(learner, 0, steps=1)
    with pytest.raises(NotImplementedError, match="not one plain model"):
        learner.export_parts(0)


# ------------------------------------------------------------------------------------------ options, recipe
@pytest.mark.parametrize(("overrides", "message"), [
    (["method=l2p", "l2p.length=3"], "even"),
    (["method=l2p", "l2p.top_k=40"], "top_k"),
    (["method=l2p", "l2p.blocks=[0, 0]"], "distinct"),
    (["method=l2p", "l2p.lr=0"], "lr must be"),
    (["method=l2p", "l2p.pull_weight=-1"], "pull_weight"),
    (["method=dualprompt", "dualprompt.e_pool=0"], "e_pool"),
    (["method=dualprompt", "dualprompt.g_length=1"], "g_length"),
    (["method=codaprompt", "codaprompt.ortho=-1"], "ortho"),
    (["method=codaprompt", "dualprompt.e_pool=3"], "do not belong"),
])
def test_bad_options_are_explained(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(("method", "options", "message"), [
    ("l2p", {"blocks": [5]}, "has 2 blocks"),
    ("dualprompt", {"e_pool": 1}, "e_pool=1 < 2 tasks"),
    ("codaprompt", {"pool": 100}, "pool <= 48"),
])
def test_options_that_do_not_fit_the_backbone_are_explained(method: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(method, **options)


@pytest.mark.parametrize("preset", ["imagenet-r-10", "cifar100-10", "domainnet-5"])
def test_paper_presets_switch_to_the_prompt_methods(preset: str) -> None:
    tasks = load_config(preset).scenario.num_tasks
    l2p = load_config(preset, ["method=l2p"])
    o = l2p.method_options
    assert (o.pool, o.length, o.top_k, o.blocks, o.mode) == (30, 20, 5, [0], "prefix")
    train = apply_recipe(o, l2p.train)
    assert (train.optimizer, train.lr, train.head_lr, train.schedule) == ("adam", 1e-3, 1e-3, "constant")
    assert l2p.train.schedule != "constant"  # the run's own section is left as it was
    dual = load_config(preset, ["method=dualprompt"]).method_options
    assert (dual.g_length, dual.g_blocks, dual.e_length, dual.e_blocks, dual.e_pool) == (6, [0, 1], 20, [2, 3, 4],
                                                                                       tasks)
    coda = load_config(preset, ["method=codaprompt", "codaprompt.lr=2e-3"])
    o = coda.method_options
    assert (o.pool, o.length, o.blocks, o.ortho) == (100, 8, [0, 1, 2, 3, 4], 0.0)
    assert apply_recipe(o, coda.train).head_lr == 2e-3 and apply_recipe(o, coda.train).schedule == "reference-cosine"
    plain_train = TrainConfig()
    assert apply_recipe(CodaPromptOptions(), plain_train) is plain_train  # nothing set: the train section itself


def test_local_cross_entropy_equals_the_reference_class_masking() -> None:
    """Training on the current head only (local targets) is the reference's masking of every other class."""
    heads = LinearHeads(8, ClassLayout.create("class", [3, 2, 4]), None, CPU)
    for t in range(3):
        heads.begin_task(t)
    features = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 4, 4, 3, 3])  # task 1's classes
    logits = heads.logits(features, 2).masked_fill(~((torch.arange(9) >= 3) & (torch.arange(9) < 5)), float("-inf"))
    assert torch.allclose(heads.loss(features, labels, 1), F.cross_entropy(logits, labels), atol=1e-6)
    assert torch.allclose(prefix_halves(torch.arange(8.0).view(1, 2, 2, 2))[0].flatten(), torch.tensor(
        [0.0, 1.0, 4.0, 5.0]))  # key halves of the chosen prompts, concatenated prompt by prompt

"""InfLoRA adapter invariants on tiny models: interference-freeness, design, merge, state, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import inflora
from conftest import mlp, tiny_bert, tiny_vit


def batches(x: torch.Tensor, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], torch.zeros(len(x[i : i + size]), dtype=torch.long)) for i in range(0, len(x), size)]


def layer_outputs(model: nn.Module, adapter: inflora.InfLoRAAdapter, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every adapted layer on ``x``."""
    outs: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda _m, _i, o, n=name: outs.__setitem__(n, o.detach().clone()))
               for name, layer in adapter.layers().items()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def train_steps(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, steps: int = 15) -> None:
    opt = torch.optim.Adam(params, lr=5e-2)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def exact_span(moment: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(moment)
    return vecs[:, vals > tol * vals.max()]


def max_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max(float((before[k] - after[k]).abs().max()) for k in before)


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return sum(float((before[k] - after[k]).norm()) for k in before) / sum(float(before[k].norm()) for k in before)


# ------------------------------------------------------------------------------------------ interference
def test_interference_free_with_a_memory_that_spans_old_inputs() -> None:
    torch.manual_seed(1)
    old_x = torch.randn(12, 4) @ torch.randn(4, 16)  # old task's inputs live in a 4-d subspace
    new_x = torch.randn(64, 16)

    def run(**options: object) -> float:
        model = mlp()
        adapter = inflora.attach(model, targets=r"^(0|2)$", rank=4, **options)
        old_stats = inflora.collect_input_stats(model, adapter, batches(old_x))
        if options.get("design", "inflora") == "inflora":
            for name, site in adapter.sites.items():  # memory = exact span of the old task's inputs
                site.memory.load(exact_span(old_stats[name]), "basis")
        before = layer_outputs(model, adapter, old_x)
        adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(new_x)))
        train_steps(model, adapter.trainable_parameters(), new_x)
        return max_change(before, layer_outputs(model, adapter, old_x))

    assert run() < 1e-5
    assert run(design="random", train_down=True, update_memory=False) > 1e-2


def test_interference_small_after_a_real_task_compared_with_seqlora() -> None:
    torch.manual_seed(0)
    x0, x1 = torch.rand(24, 3, 32, 32), torch.rand(24, 3, 32, 32) * 0.5 + 0.5

    def change(**options: object) -> float:
        model = tiny_vit()
        adapter = inflora.attach(model, preset="timm-vit-kv", rank=4, num_tasks=2, lamb=0.9999, **options)
        for t, x in enumerate((x0, x1)):
            if t == 1:
                before = layer_outputs(model, adapter, x0)
            adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(x)))
            train_steps(model, adapter.trainable_parameters(), x, steps=10)
            adapter.end_task(inflora.collect_input_stats(model, adapter, batches(x)))
        return relative_change(before, layer_outputs(model, adapter, x0))

    # measured: 0.22 (InfLoRA) vs 3.27 (SeqLoRA); the memory keeps 99.99% of the old inputs' energy, not all of it
    inf, seq = change(), change(design="random", train_down=True, update_memory=False)
    assert inf < 0.2 * seq, (inf, seq)


# ------------------------------------------------------------------------------------------ design
def test_designed_rows_are_scaled_orthonormal_and_orthogonal_to_memory(vit: nn.Module) -> None:
    adapter = inflora.attach(vit, preset="timm-vit-kv", rank=6, num_tasks=3, lamb=0.9)
    torch.manual_seed(0)
    for task in range(3):
        x = torch.rand(16, 3, 32, 32) + task
        downs = adapter.begin_task(inflora.collect_input_stats(vit, adapter, batches(x)))
        for name, down in downs.items():
            d = down.double()
            gram = d @ d.T
            assert torch.allclose(gram, torch.eye(6, dtype=torch.float64) / 3, atol=1e-6)
            old = adapter.sites[name].memory.old_projector()
            assert float((old @ d.T).abs().max()) < 1e-6
        adapter.end_task(inflora.collect_input_stats(vit, adapter, batches(x)))


def test_design_fills_rank_deficient_statistics_inside_the_complement() -> None:
    memory = inflora.SubspaceMemory(10)
    memory.load(torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64))[0], "basis")
    h = torch.randn(10, 2, dtype=torch.float64)  # new task spans only 2 directions, rank asks for 5
    down = inflora.design_down(h @ h.T, memory, 5)
    assert torch.allclose(down @ down.T, torch.eye(5, dtype=torch.float64) / 3, atol=1e-10)
    assert float((memory.basis.T @ down.T).abs().max()) < 1e-10


def test_both_projections_design_rows_outside_the_memory() -> None:
    torch.manual_seed(0)
    memory = inflora.SubspaceMemory(12)
    memory.load(torch.linalg.qr(torch.randn(12, 4, dtype=torch.float64))[0], "basis")
    h = torch.randn(12, 40, dtype=torch.float64)
    c = h @ h.T / 40
    one = inflora.design_down(c, memory, 3, projection="one-sided")
    two = inflora.design_down(c, memory, 3, projection="two-sided")
    for down in (one, two):
        assert float((memory.basis.T @ down.T).abs().max()) < 1e-10
        assert torch.allclose(down @ down.T, torch.eye(3, dtype=torch.float64) / 3, atol=1e-10)
    # two-sided = leading eigenvectors of P C P; one-sided = left singular vectors of P C (the reference)
    p = memory.new_projector()
    top = torch.linalg.eigh(p @ c @ p).eigenvectors[:, -3:]
    assert torch.allclose(two.T @ two * 3, top @ top.T, atol=1e-8)
    left = torch.linalg.svd(p @ c).U[:, :3]
    assert torch.allclose(one.T @ one * 3, left @ left.T, atol=1e-8)


def test_ablation_designs() -> None:
    memory = inflora.SubspaceMemory(8)
    memory.load(torch.eye(8, dtype=torch.float64)[:, :3], "basis")
    comp = inflora.design_down(None, memory, 5, design="complement")
    assert float(comp[:, :3].abs().max()) < 1e-12
    rand = inflora.design_down(None, memory, 5, design="random")
    assert rand.shape == (5, 8) and float(rand.abs().max()) <= 1 / 8**0.5
    with pytest.raises(ValueError, match="statistics"):
        inflora.design_down(None, memory, 5, design="new-task")


# ------------------------------------------------------------------------------------------ training state
def test_only_the_current_task_branch_is_trainable() -> None:
    model = mlp()
    adapter = inflora.attach(model, targets=r"^(0|2)$", rank=2, merge=False, num_tasks=12)
    x = torch.randn(32, 16)
    for _ in range(12):
        adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(x)))
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in adapter.trainable_parameters()}
        assert len(trainable) == 2
        expected = {id(layer.branch(adapter.current_task).up) for layer in adapter.layers().values()}
        assert trainable == expected
        adapter.end_task(inflora.collect_input_stats(model, adapter, batches(x)))
    assert adapter.trainable_parameters() == []
    assert not any(p.requires_grad for p in model.parameters())


def test_blocks_selects_the_first_blocks() -> None:
    model = tiny_vit(depth=4)
    adapter = inflora.attach(model, preset="timm-vit-kv", blocks=2)
    assert sorted(s.block for s in adapter.sites.values()) == [0, 1]
    model = tiny_vit(depth=4)
    adapter = inflora.attach(model, preset="timm-vit-kv", blocks=[1, 3])
    assert sorted(s.block for s in adapter.sites.values()) == [1, 3]


def test_fused_qkv_branch_leaves_query_untouched(vit: nn.Module) -> None:
    adapter = inflora.attach(vit, preset="timm-vit-kv", rank=3)
    layer = next(iter(adapter.layers().values()))
    x = torch.randn(5, layer.in_features)
    base = layer.base(x)
    layer.add_branch("0", torch.randn(3, layer.in_features))
    with torch.no_grad():
        layer.branch(0).up.normal_()
    out = layer(x)
    d = layer.out_features // 3
    assert torch.equal(out[:, :d], base[:, :d])
    assert (out[:, d:] - base[:, d:]).abs().min() > 0


def test_bert_key_and_value_share_one_site_and_down_projection() -> None:
    model = tiny_bert()
    adapter = inflora.attach(model, preset="bert-kv", rank=4)
    assert len(adapter.sites) == 2
    ids = torch.randint(5, 60, (4, 7))
    loader = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    adapter.begin_task(inflora.collect_input_stats(model, adapter, loader))
    for site in adapter.sites.values():
        (_, key), (_, value) = site.layers
        assert torch.equal(key.branch(0).down, value.branch(0).down)
        assert key.branch(0).up is not value.branch(0).up


# ------------------------------------------------------------------------------------------ merge and state
def _two_tasks(model: nn.Module, adapter: inflora.InfLoRAAdapter, xs: list[torch.Tensor]) -> None:
    for x in xs:
        adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(x)))
        torch.manual_seed(0)
        train_steps(model, adapter.trainable_parameters(), x, steps=5)
        adapter.end_task(inflora.collect_input_stats(model, adapter, batches(x)))


def test_merged_equals_unmerged() -> None:
    torch.manual_seed(0)
    xs = [torch.rand(16, 3, 32, 32), torch.rand(16, 3, 32, 32)]
    merged, unmerged = tiny_vit(), tiny_vit()
    a = inflora.attach(merged, preset="timm-vit-kv", rank=4, num_tasks=2)
    b = inflora.attach(unmerged, preset="timm-vit-kv", rank=4, num_tasks=2, merge=False)
    _two_tasks(merged, a, xs)
    _two_tasks(unmerged, b, xs)
    assert all(not layer.branches for layer in a.layers().values())
    assert all(len(layer.branches) == 2 for layer in b.layers().values())
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        out_b = unmerged(x)
        assert torch.allclose(merged(x), out_b, atol=1e-5)
        assert b.merge_branches() == 2
        assert torch.allclose(unmerged(x), out_b, atol=1e-5)


def test_save_load_restores_outputs_and_next_design(tmp_path) -> None:
    torch.manual_seed(0)
    xs = [torch.rand(16, 3, 32, 32), torch.rand(16, 3, 32, 32)]
    model = tiny_vit()
    adapter = inflora.attach(model, preset="timm-vit-kv", rank=4, num_tasks=3, lamb=0.9)
    _two_tasks(model, adapter, xs)
    save_file(adapter.state_dict(), tmp_path / "adapter.safetensors")

    restored = tiny_vit()
    adapter2 = inflora.attach(restored, preset="timm-vit-kv", rank=4, num_tasks=3, lamb=0.9)
    adapter2.load_state_dict(load_file(tmp_path / "adapter.safetensors"))
    assert adapter2.current_task == 2 and adapter2.memory_dims() == adapter.memory_dims()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    nxt = torch.rand(16, 3, 32, 32)
    d1 = adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(nxt)))
    d2 = adapter2.begin_task(inflora.collect_input_stats(restored, adapter2, batches(nxt)))
    assert all(torch.equal(d1[k], d2[k]) for k in d1)


def test_state_mid_task_and_unmerged_round_trip() -> None:
    model = mlp()
    adapter = inflora.attach(model, targets=r"^(0|2)$", rank=2, merge=False)
    x = torch.randn(32, 16)
    _two_tasks(model, adapter, [x])
    adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(x)))
    train_steps(model, adapter.trainable_parameters(), x, steps=3)
    state = adapter.state_dict()
    model2 = mlp()
    adapter2 = inflora.attach(model2, targets=r"^(0|2)$", rank=2, merge=False)
    adapter2.load_state_dict(state)
    assert adapter2.in_task and adapter2.current_task == 1
    assert len(adapter2.trainable_parameters()) == 2
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))


def test_load_refuses_other_config_or_model() -> None:
    model = mlp()
    adapter = inflora.attach(model, targets=r"^(0|2)$", rank=2)
    state = adapter.state_dict()
    with pytest.raises(ValueError, match="rank"):
        inflora.attach(mlp(), targets=r"^(0|2)$", rank=3).load_state_dict(state)
    with pytest.raises(ValueError, match="sites"):
        inflora.attach(mlp(), targets=r"^0$", rank=2).load_state_dict(state)
    with pytest.raises(ValueError, match="corrupt"):
        inflora.attach(mlp(), targets=r"^(0|2)$", rank=2).load_state_dict({"meta": torch.tensor([1, 2, 250],
                                                                                               dtype=torch.uint8)})


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_reported_clearly(vit: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"unknown preset .nope.*timm-vit-kv"):
        inflora.attach(vit, preset="nope")
    with pytest.raises(ValueError, match=r"matches no nn\.Linear.*blocks\.0\.attn\.qkv"):
        inflora.attach(vit, targets=r"does_not_exist")
    with pytest.raises(ValueError, match="rank 1000 exceeds"):
        inflora.attach(vit, preset="timm-vit-kv", rank=1000)
    with pytest.raises(ValueError, match="blocks=9"):
        inflora.attach(tiny_vit(), preset="timm-vit-kv", blocks=9)
    with pytest.raises(TypeError, match="unknown InfLoRA option"):
        inflora.attach(tiny_vit(), preset="timm-vit-kv", rnak=3)
    with pytest.raises(ValueError, match="exactly one"):
        inflora.attach(tiny_vit())


def test_stats_from_another_model_are_refused(vit: nn.Module) -> None:
    adapter = inflora.attach(vit, preset="timm-vit-kv", rank=2)
    other = mlp()
    other_adapter = inflora.attach(other, targets=r"^(0|2)$", rank=2)
    stats = inflora.collect_input_stats(other, other_adapter, batches(torch.randn(8, 16)))
    with pytest.raises(ValueError, match="do not belong"):
        adapter.begin_task(stats)
    good = inflora.collect_input_stats(vit, adapter, batches(torch.rand(4, 3, 32, 32)))
    wrong_shape = {k: torch.eye(3, dtype=torch.float64) for k in good}
    with pytest.raises(ValueError, match="shape"):
        adapter.begin_task(wrong_shape)
    with pytest.raises(ValueError, match="no input reached"):
        inflora.collect_input_stats(other, adapter, batches(torch.randn(8, 16)))
    with pytest.raises(RuntimeError, match="begin_task first"):
        adapter.end_task(good)
    adapter.begin_task(good)
    with pytest.raises(RuntimeError, match="end_task first"):
        adapter.begin_task(good)


# ------------------------------------------------------------------------------------------ atomicity, short rank
def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_rank_given_as_text_is_refused_clearly() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="rank must be an integer"):
        inflora.attach(model, targets=r"^(0|2)$", rank="10")
    assert not any(isinstance(m, inflora.LoRALinear) for m in model.modules())


def test_failed_attach_leaves_the_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="rank 10 exceeds the input width 8"):  # fits layer 0, not layer 2
        inflora.attach(model, targets=r"^(0|2)$", rank=10)
    assert not any(isinstance(m, inflora.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())

    from inflora.adapter import adapter as adapter_module

    real, calls = adapter_module.SubspaceMemory, []

    def failing_memory(*args: object, **kwargs: object) -> object:  # the second site fails after wrapping
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_module, "SubspaceMemory", failing_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        inflora.attach(model, targets=r"^(0|2)$", rank=4)
    assert not any(isinstance(m, inflora.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _trained_state() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model = mlp()
    adapter = inflora.attach(model, targets=r"^(0|2)$", rank=2, merge=False)
    x = torch.randn(32, 16)
    _two_tasks(model, adapter, [x, x + 1])
    return adapter.state_dict(), x


@pytest.mark.parametrize("damage", ["missing", "wrong-shape-up", "wrong-shape-down", "wrong-shape-memory"])
def test_failed_load_state_dict_changes_nothing(damage: str) -> None:
    state, x = _trained_state()
    state = dict(state)
    if damage == "missing":
        del state["site1.layer0.up1"]
    elif damage == "wrong-shape-up":
        state["site1.layer0.up1"] = torch.zeros(3, 3)
    elif damage == "wrong-shape-down":
        state["site1.layer0.down1"] = torch.zeros(2, 7)
    else:
        state["site1.memory"] = torch.zeros(5, 5, dtype=torch.float64)
    model = mlp()
    adapter = inflora.attach(model, targets=r"^(0|2)$", rank=2, merge=False)
    with torch.no_grad():
        out = model(x)
    weights, before = _snapshot(model), adapter.state_dict()
    with pytest.raises(ValueError, match=r"corrupt adapter state: .*site1"):
        adapter.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(x), out)
    after = adapter.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _snapshot(model).keys() == weights.keys()
    assert adapter.current_task == 0 and not adapter.in_task and all(not s.downs for s in adapter.sites.values())
    assert all(not layer.branches for layer in adapter.layers().values())
    assert all(s.memory.size == 0 for s in adapter.sites.values())


def test_rank_above_the_free_space_keeps_old_outputs_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """rank = input width with lamb 1.0: after the first task the old inputs' span is remembered, so later tasks'
    D_t get only the free directions and the old inputs' outputs at the adapted layer do not move."""
    torch.manual_seed(3)
    q = torch.linalg.qr(torch.randn(16, 16))[0]
    xs = [torch.randn(48, 4) @ q[:, 4 * t : 4 * t + 4].T for t in range(3)]  # each task spans its own 4 directions
    # plus a faint fifth direction in the first task: the first memory's rule (the reference's: the directions
    # whose cumulative energy stays below eps) leaves out the weakest direction with energy, even at lamb 1.0
    xs[0] = xs[0] + 1e-3 * torch.randn(48, 1) @ q[:, 12:13].T
    model = mlp()
    adapter = inflora.attach(model, targets=r"^0$", rank=16, lamb=1.0, num_tasks=3)
    caplog.set_level("WARNING", logger="inflora")
    outputs = []
    for t, x in enumerate(xs):
        if t:
            outputs.append(layer_outputs(model, adapter, xs[0]))
        downs = adapter.begin_task(inflora.collect_input_stats(model, adapter, batches(x)))
        if t:
            (down,) = downs.values()
            assert down.shape[0] < 16  # only the free directions
        train_steps(model, adapter.trainable_parameters(), x, steps=15)
        adapter.end_task(inflora.collect_input_stats(model, adapter, batches(x)))
    outputs.append(layer_outputs(model, adapter, xs[0]))
    scale = max(float(o.abs().max()) for o in outputs[0].values())
    assert max_change(outputs[0], outputs[-1]) < 1e-4 * scale
    warnings = [r for r in caplog.records if "free directions" in r.getMessage()]
    assert len(warnings) == 1
    assert adapter.short[1] and adapter.short[2] and not adapter.short[0]

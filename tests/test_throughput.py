"""benchmarks/throughput.py: the reference-style layer computes what the reference computes, and one tiny run
compares the two sides at two tasks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_layer_sums_every_tasks_branch_on_keys_and_values() -> None:
    bench = load_benchmark()
    torch.manual_seed(0)
    base = nn.Linear(8, 24)
    layer = bench.SummedBranchesQKV(base, rank=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        layer.add_task(generator)
    with torch.no_grad():
        for up in (*layer.ups_k, *layer.ups_v):
            up.normal_()
    assert [up.requires_grad for up in layer.ups_k] == [False, False, True]  # only the current task's B trains
    assert not any(a.requires_grad for a in layer.downs)
    x = torch.randn(5, 4, 8)
    sum_k = sum(b @ a for a, b in zip(layer.downs, layer.ups_k, strict=True))
    sum_v = sum(b @ a for a, b in zip(layer.downs, layer.ups_v, strict=True))
    expected = base(x) + torch.cat([torch.zeros(5, 4, 8), x @ sum_k.T, x @ sum_v.T], dim=-1)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    gram = layer.downs[0] @ layer.downs[0].T
    assert torch.allclose(gram, torch.eye(2) / 3, atol=1e-6)  # designed-like rows: orthonormal / sqrt(3)


def test_tiny_run_measures_both_sides_at_each_task(tmp_path: Path, capsys) -> None:
    bench = load_benchmark()
    out = tmp_path / "throughput.json"
    assert bench.main(["--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2",
                       "--steps", "1", "--warmup", "0", "--tasks", "1,3", "--threads", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {(r["task"], r["side"]): r for r in results["rows"]}
    assert set(rows) == {(t, s) for t in (1, 3) for s in ("inflora", "reference")}
    assert all(r["samples_per_s"] > 0 and r["peak_memory_mib"] >= 0 for r in rows.values())
    # ours: earlier branches merged, one live branch, SDPA; the reference: every branch live, unfused attention
    assert rows[3, "inflora"]["merged_per_layer"] == 2 and rows[3, "inflora"]["branches_per_layer"] == 1
    assert rows[3, "reference"]["branches_per_layer"] == 3
    assert rows[1, "inflora"]["fused_attn"] > 0 and rows[1, "reference"]["fused_attn"] == 0
    for task in ("1", "3"):
        ratio = results["ratios"][task]["speed"]
        assert ratio == rows[int(task), "inflora"]["samples_per_s"] / rows[int(task), "reference"]["samples_per_s"]
    assert "inflora / reference speed" in capsys.readouterr().out

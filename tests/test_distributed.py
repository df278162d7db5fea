"""Distributed training: batch shares, rank-aware helpers, and 2-process gloo runs under torchrun that reproduce a
1-process run (accuracies, designed subspaces, class statistics)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inflora import distributed, runtime
from inflora.cli import main
from inflora.config import ConfigError, load_config
from inflora.engine import Experiment
from inflora.faults import FAULT_ENV, InjectedFault
from inflora.sampling import LengthGroupedBatches, RankShares, ShuffledBatches
from test_checkpoint import (
    Reference,
    final_tensors,
    latest,
    reference_run,
    results_of,
    run_args,
    same_results,
    single_thread,
)

one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
reference = pytest.fixture(scope="module", name="reference")(reference_run)


# ------------------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_shares_cover_each_global_batch_once(world: int) -> None:
    plan = ShuffledBatches(37, 8, seed=3)
    shares = [RankShares(plan, r, world).shares() for r in range(world)]
    assert all(len(s) == len(plan) for s in shares)  # every rank takes part in every step
    for step, batch in enumerate(plan.batches()):
        real = [s[step][0] for s in shares if s[step][1] > 0]
        assert [i for share in real for i in share] == batch  # contiguous shares, in order
        assert sum(s[step][1] for s in shares) / world == pytest.approx(1.0)  # DDP's mean of weighted means


def test_rank_shares_of_one_process_are_the_plan() -> None:
    plan = LengthGroupedBatches([5, 1, 9, 3, 7, 2, 8] * 5, 4, seed=1)
    shares = RankShares(plan, 0, 1)
    assert list(shares) == plan.batches() and set(shares.weights()) == {1.0}


def test_rank_shares_pad_empty_shares_with_zero_weight() -> None:
    plan = ShuffledBatches(9, 8, seed=0)  # last global batch holds one sample
    last = plan.batches()[-1]
    assert RankShares(plan, 0, 2).shares()[-1] == (last, 2.0)
    assert RankShares(plan, 1, 2).shares()[-1] == (last, 0.0)
    with pytest.raises(ValueError, match="rank 2"):
        RankShares(plan, 2, 2)


def test_shuffled_batches_depend_only_on_the_seed() -> None:
    a, b = ShuffledBatches(20, 6, 7), ShuffledBatches(20, 6, 7)
    assert a.batches() == b.batches() != ShuffledBatches(20, 6, 8).batches()
    assert sorted(i for batch in a.batches() for i in batch) == list(range(20)) and len(a) == 4


# ------------------------------------------------------------------------------------------------ helpers
def test_helpers_are_no_ops_in_one_process() -> None:
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.broadcast_bytes(b"abc") == b"abc"
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.on_main(lambda: 5) == 5
    with pytest.raises(ConfigError):
        distributed.on_main(lambda: (_ for _ in ()).throw(ConfigError("x")))
    assert not distributed.init_from_env("cpu")  # WORLD_SIZE unset: nothing to join


def test_global_batch_must_split_evenly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runtime, "world_size", lambda: 2)  # what Runtime.create reads
    config = load_config(None, ["train.batch_size=7", f"data.data_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"batch_size=7 is the global batch.*divisible.*\(2\)"):
        Experiment(config)


# ------------------------------------------------------------------------------------------------ torchrun
def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=nproc -m inflora <args>`` on CPU (gloo)."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "inflora", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_match_one(reference: Reference, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = torchrun([*run_args(reference.images, "train.device=cpu"), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_results(results_of(out), reference.results)
    assert proc.stdout.count("results in") == 1  # only rank 0 prints and writes
    mine, theirs = final_tensors(out), final_tensors(reference.out)
    assert set(mine) == set(theirs)
    for key in theirs:  # designed subspaces, up-projections, memory, heads, class statistics
        if key.endswith(".memory"):  # a basis is defined up to a rotation: compare the spaces (projectors)
            torch.testing.assert_close(mine[key] @ mine[key].T, theirs[key] @ theirs[key].T, rtol=1e-4, atol=1e-5,
                                       msg=key)
        elif not key.startswith("rng."):
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_two_processes_resume_a_one_process_run(reference: Reference, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "train:task=2:epoch=0:step=1:raise")
    with pytest.raises(InjectedFault):
        main([*run_args(reference.images), "--out", str(out)])
    assert latest(out) == "task_002"
    proc = torchrun([*run_args(reference.images), "--out", str(out), "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_results(results_of(out), reference.results)


@pytest.mark.slow
def test_error_on_rank_zero_stops_every_rank(reference: Reference, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("occupied")
    proc = torchrun([*run_args(reference.images), "--out", str(out)], tmp_path)
    assert proc.returncode != 0 and "inflora: config error: output folder" in proc.stderr
    assert not (out / "config.yaml").exists()


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from inflora.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(runtime, "is_distributed", lambda: True)
    monkeypatch.setattr(runtime, "local_rank", lambda: 1)
    with pytest.raises(ValueError, match=r"LOCAL_RANK 1 but only 1 GPU.*train\.device=cpu"):
        resolve_device("auto")
    monkeypatch.setattr(runtime, "local_rank", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="names one GPU"):
        resolve_device("cuda:0")

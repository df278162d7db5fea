"""Input statistics: exact second moments, padding excluded, distributed sums."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import inflora
from conftest import mlp, tiny_bert


def test_second_moment_matches_direct_computation() -> None:
    model = mlp()
    adapter = inflora.attach(model, targets=r"^0$", rank=2)
    x = torch.randn(30, 16)
    loader = [(x[:7], None), (x[7:20], None), (x[20:], None)]
    stats = inflora.collect_input_stats(model, adapter, loader)
    expected = x.double().T @ x.double() / 30
    assert torch.allclose(stats["0"], expected, atol=1e-12)
    assert stats.tokens["0"] == 30 and stats["0"].dtype == torch.float64
    assert model.training  # mode restored


def test_float32_batch_products_stay_within_float32_rounding_of_float64() -> None:
    """The learner's default (each batch's x^T x in float32, sums in float64) against the all-float64 moment."""
    model = mlp()
    adapter = inflora.attach(model, targets=r"^0$", rank=2)
    x = torch.randn(3000, 16) + 4.0  # a dominant mean direction, as real inputs have
    expected = x.double().T @ x.double() / 3000
    with torch.no_grad(), inflora.StatsCollector(adapter, products=torch.float32) as collector:
        for i in range(0, 3000, 250):
            model(x[i:i + 250])
    got = collector.result()["0"]
    assert got.dtype == torch.float64 and collector.products == torch.float32
    err = (got - expected).norm() / expected.norm()
    assert 0 < err < 1e-6  # float32 rounding happened, and stays at its scale
    assert torch.allclose(torch.linalg.eigvalsh(got), torch.linalg.eigvalsh(expected), rtol=1e-5, atol=1e-5)


def test_padding_tokens_do_not_count() -> None:
    model = tiny_bert()
    adapter = inflora.attach(model, preset="bert-kv", rank=2)
    torch.manual_seed(0)
    short = torch.randint(5, 60, (1, 5))
    long = torch.randint(5, 60, (1, 9))
    unpadded = [{"input_ids": short, "attention_mask": torch.ones_like(short)},
                {"input_ids": long, "attention_mask": torch.ones_like(long)}]
    padded_short = torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded = [{"input_ids": torch.cat([padded_short, long]),
               "attention_mask": torch.cat([torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], 1),
                                            torch.ones(1, 9)]).long()}]
    a = inflora.collect_input_stats(model, adapter, unpadded)
    b = inflora.collect_input_stats(model, adapter, padded)
    for name in a:
        assert a.tokens[name] == b.tokens[name] == 14
        assert torch.allclose(a[name], b[name], atol=1e-6)
    # a batch passed as (inputs, labels) with a mask behaves the same
    c = inflora.collect_input_stats(model, adapter, [(padded[0], torch.zeros(2))])
    assert all(torch.allclose(b[n], c[n]) for n in b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, x: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = mlp()
        adapter = inflora.attach(model, targets=r"^(0|2)$", rank=2)
        shard = x[rank::world]
        stats = inflora.collect_input_stats(model, adapter, [(shard[i : i + 5], None) for i in range(0, len(shard), 5)])
        out[rank] = ({k: v.clone() for k, v in stats.items()}, dict(stats.tokens))
    finally:
        dist.destroy_process_group()


def test_distributed_statistics_equal_single_process() -> None:
    torch.manual_seed(0)
    x = torch.randn(23, 16)  # uneven shards: 12 and 11 samples
    model = mlp()
    adapter = inflora.attach(model, targets=r"^(0|2)$", rank=2)
    single = inflora.collect_input_stats(model, adapter, [(x, None)])
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), x, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        moments, tokens = results[rank]
        for name in single:
            assert tokens[name] == 23
            assert torch.allclose(moments[name], single[name], atol=1e-6)  # float32 activations

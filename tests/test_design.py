"""Design of the down-projection D (spec section 3) when the old space leaves fewer than r free directions."""

from __future__ import annotations

import pytest
import torch

import inflora
from inflora.adapter.design import free_dims

F64 = torch.float64


def orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))[0]


def moment(d: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(d, n, generator=g, dtype=F64) * (0.8 ** torch.arange(d, dtype=F64))[:, None]
    h = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0] @ h + torch.randn(d, 1, generator=g, dtype=F64)
    return h @ h.T / n


def basis_memory(old: torch.Tensor) -> inflora.SubspaceMemory:
    memory = inflora.SubspaceMemory(old.shape[0], dual=False)
    memory.load(old, "basis")
    return memory


def complement_memory(old: torch.Tensor) -> inflora.SubspaceMemory:
    """The same old space held in complement mode (the basis of its orthogonal complement)."""
    d, k = old.shape
    memory = inflora.SubspaceMemory(d)
    memory.load(torch.linalg.svd(old, full_matrices=True)[0][:, k:], "complement")
    return memory


def check_rows(down: torch.Tensor, memory: inflora.SubspaceMemory, rows: int) -> None:
    """``rows`` rows, exactly orthonormal / sqrt(3), orthogonal to the old space."""
    assert down.shape == (rows, memory.dim) and down.dtype == F64 and down.is_contiguous()
    if rows == 0:
        return
    assert float((3 * down @ down.T - torch.eye(rows, dtype=F64)).abs().max()) < 1e-10
    assert float((down @ memory.old_projector()).abs().max()) < 1e-8


@pytest.mark.parametrize("holder", [basis_memory, complement_memory])
def test_free_dims_in_both_modes(holder) -> None:
    assert free_dims(holder(orthonormal(10, 7))) == 3
    assert free_dims(inflora.SubspaceMemory(10)) == 10


@pytest.mark.parametrize("holder", [basis_memory, complement_memory])
@pytest.mark.parametrize("projection", ["one-sided", "two-sided"])
def test_two_free_directions_and_rank_four_give_two_rows(holder, projection: str) -> None:
    d = 16
    memory = holder(orthonormal(d, d - 2))
    assert free_dims(memory) == 2
    down = inflora.design_down(moment(d, 50), memory, 4, projection=projection)
    check_rows(down, memory, 2)
    # the two rows span exactly the free space (the only directions outside the old space)
    assert torch.allclose(3 * down.T @ down, memory.new_projector(), atol=1e-10)
    comp = inflora.design_down(None, memory, 4, design="complement")
    check_rows(comp, memory, 2)
    assert torch.allclose(3 * comp.T @ comp, memory.new_projector(), atol=1e-10)


@pytest.mark.parametrize("holder", [basis_memory, complement_memory])
def test_full_memory_gives_no_rows_and_ablations_keep_rank(holder) -> None:
    d = 12
    memory = holder(orthonormal(d, d))
    assert free_dims(memory) == 0
    for projection in ("one-sided", "two-sided"):
        down = inflora.design_down(moment(d, 40), memory, 3, projection=projection)
        assert down.shape == (0, d) and down.dtype == F64
    assert inflora.design_down(None, memory, 3, design="complement").shape == (0, d)
    # ablations that ignore the memory keep r rows
    new_task = inflora.design_down(moment(d, 40), memory, 3, design="new-task")
    assert new_task.shape == (3, d)
    assert torch.allclose(3 * new_task @ new_task.T, torch.eye(3, dtype=F64), atol=1e-10)
    assert inflora.design_down(None, memory, 3, design="random").shape == (3, d)


@pytest.mark.parametrize("projection", ["one-sided", "two-sided"])
def test_rank_deficient_statistics_fill_from_the_complement(projection: str) -> None:
    d = 10
    memory = basis_memory(orthonormal(d, 3))
    h = torch.randn(d, 2, generator=torch.Generator().manual_seed(3), dtype=F64)  # 2 directions, rank asks for 5
    down = inflora.design_down(h @ h.T, memory, 5, projection=projection)
    check_rows(down, memory, 5)
    # the new task's two directions (with the old space removed) are among the rows
    p = memory.new_projector()
    span = torch.linalg.qr(p @ h)[0]
    assert torch.allclose(3 * down.T @ down @ span, span, atol=1e-10)


@pytest.mark.parametrize("holder", [basis_memory, complement_memory])
def test_rank_deficient_statistics_with_fewer_free_directions_than_rank(holder) -> None:
    d = 10
    memory = holder(orthonormal(d, d - 4))
    h = torch.randn(d, 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    down = inflora.design_down(h @ h.T, memory, 6)
    check_rows(down, memory, 4)
    assert torch.allclose(3 * down.T @ down, memory.new_projector(), atol=1e-10)


def test_complement_design_rows() -> None:
    d = 8
    memory = basis_memory(torch.eye(d, dtype=F64)[:, :3])
    comp = inflora.design_down(None, memory, 4, design="complement")
    check_rows(comp, memory, 4)
    assert float(comp[:, :3].abs().max()) < 1e-12
    check_rows(inflora.design_down(None, memory, 7, design="complement"), memory, 5)
    check_rows(inflora.design_down(None, inflora.SubspaceMemory(d), 7, design="complement"),
               inflora.SubspaceMemory(d), 7)


def test_two_sided_design_with_fewer_free_directions_than_rank() -> None:
    d = 14
    memory = complement_memory(orthonormal(d, d - 5))
    c = moment(d, 60)
    down = inflora.design_down(c, memory, 8, projection="two-sided")
    check_rows(down, memory, 5)
    down3 = inflora.design_down(c, memory, 3, projection="two-sided")
    check_rows(down3, memory, 3)
    p = memory.new_projector()
    top = torch.linalg.eigh(p @ c @ p).eigenvectors[:, -3:]  # leading eigenvectors of P C P
    assert torch.allclose(3 * down3.T @ down3, top @ top.T, atol=1e-8)


def test_one_and_two_sided_agree_when_new_inputs_avoid_the_old_space() -> None:
    d = 16
    old = orthonormal(d, 6)
    memory = basis_memory(old)
    free = torch.linalg.svd(old, full_matrices=True)[0][:, 6:]  # complement of the old space
    g = torch.Generator().manual_seed(5)
    h = free @ (torch.randn(10, 80, generator=g, dtype=F64) * (0.7 ** torch.arange(10, dtype=F64))[:, None])
    c = h @ h.T / 80  # range orthogonal to the old space: P C = P C P = C
    for rank in (3, 10):
        one = inflora.design_down(c, memory, rank, projection="one-sided")
        two = inflora.design_down(c, memory, rank, projection="two-sided")
        check_rows(one, memory, rank)
        check_rows(two, memory, rank)
        assert torch.allclose(one.T @ one, two.T @ two, atol=1e-8)


@pytest.mark.parametrize("dual", [True, False])
def test_rows_stay_valid_while_a_real_memory_fills_the_layer(dual: bool) -> None:
    """Grow a memory task by task until it spans everything; every design along the way is valid."""
    d, rank = 12, 4
    memory = inflora.SubspaceMemory(d, dual=dual)
    seen_short = False
    for t in range(40):
        c = moment(d, 30, seed=10 + t)
        q = min(rank, free_dims(memory))
        seen_short |= q < rank
        for projection in ("one-sided", "two-sided"):
            check_rows(inflora.design_down(c, memory, rank, projection=projection), memory, q)
        check_rows(inflora.design_down(None, memory, rank, design="complement"), memory, q)
        if q == 0:
            break
        memory.update(c, 0.9999)
    assert seen_short and free_dims(memory) == 0

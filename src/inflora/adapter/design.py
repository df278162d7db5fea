"""Design of a task's down-projection ``D_t`` from its input statistics and the memory (spec section 3)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..lora import kaiming_down
from .memory import SubspaceMemory

Projection = Literal["one-sided", "two-sided"]
Design = Literal["inflora", "random", "new-task", "complement"]
DESIGNS: tuple[str, ...] = ("inflora", "random", "new-task", "complement")
SCALE = 1.0 / math.sqrt(3.0)
_RTOL = 1e-10


def _leading_left_vectors(matrix: torch.Tensor, rank: int, allowed: torch.Tensor) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` (d, rank), kept inside ``allowed``'s range.

    When ``matrix`` has fewer than ``rank`` non-negligible singular values, SVD returns arbitrary vectors for the
    rest, which may point into the old space. Those are replaced by orthonormal directions of the projector
    ``allowed`` (the complement of the old space) that are orthogonal to the vectors already chosen. With full-rank
    statistics, as real data gives, this never triggers and the result is the reference's.
    """
    u, s, _ = torch.linalg.svd(matrix)
    good = int((s > s[0] * _RTOL).sum()) if s.numel() and s[0] > 0 else 0
    if good >= rank:
        return u[:, :rank]
    chosen = u[:, :good]
    rest = allowed - chosen @ (chosen.T @ allowed)
    u_rest, _, _ = torch.linalg.svd(rest)
    return torch.cat([chosen, u_rest[:, : rank - good]], dim=1)


def design_down(
    moment: torch.Tensor | None,
    memory: SubspaceMemory,
    rank: int,
    *,
    design: Design = "inflora",
    projection: Projection = "one-sided",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the designed down-projection ``D`` (rank, d) in float64.

    * ``"inflora"`` (the method): leading left singular vectors of the new task's second moment with the old
      space removed, ``(I - M M^T) C`` (``projection="one-sided"``, the reference) or ``P C P`` with
      ``P = I - M M^T`` (``"two-sided"``, the paper's form on the input matrix), scaled by ``1/sqrt(3)``.
    * ``"new-task"`` (ablation): from ``C`` without removing the old space.
    * ``"complement"`` (ablation): any ``rank`` orthonormal directions of the old space's complement (no new data).
    * ``"random"`` (SeqLoRA / ablation): PyTorch's default LoRA initialisation, no scaling.
    """
    dim = memory.dim
    if rank > dim:
        raise ValueError(f"rank {rank} exceeds the layer's input width {dim}")
    if design == "random":
        return kaiming_down(rank, dim, generator=generator).to(memory.basis.device)
    allowed = memory.new_projector()
    if design == "complement":
        return _leading_left_vectors(allowed, rank, allowed).T * SCALE
    if moment is None:
        raise ValueError(f"design {design!r} needs the new task's input statistics")
    c = moment.to(device=memory.basis.device, dtype=torch.float64)
    if c.shape != (dim, dim):
        raise ValueError(f"second moment has shape {tuple(c.shape)}, expected ({dim}, {dim})")
    if design == "new-task":
        eye = torch.eye(dim, dtype=torch.float64, device=c.device)
        return _leading_left_vectors(c, rank, eye).T * SCALE
    if design != "inflora":
        raise ValueError(f"unknown design {design!r}: expected one of {', '.join(DESIGNS)}")
    if projection == "one-sided":
        c_hat = memory.remove_old(c)
    elif projection == "two-sided":
        c_hat = allowed @ c @ allowed
    else:
        raise ValueError(f"unknown projection {projection!r}: expected 'one-sided' or 'two-sided'")
    return _leading_left_vectors(c_hat, rank, allowed).T * SCALE

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


def free_dims(memory: SubspaceMemory) -> int:
    """Dimension of the complement of the old space held by ``memory``: ``d - memory.memory_dim``.

    The "inflora" and "complement" designs give at most this many rows.
    """
    return int(memory.dim - memory.memory_dim)


def _leading_left_vectors(matrix: torch.Tensor, rank: int, allowed: torch.Tensor) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` (d, rank), kept inside ``allowed``'s range.

    When ``matrix`` has fewer than ``rank`` non-negligible singular values, SVD returns arbitrary vectors for the
    rest, which may point into the old space. Those are replaced by orthonormal directions of the projector
    ``allowed`` (the complement of the old space) that are orthogonal to the vectors already chosen. With full-rank
    statistics, as real data gives, this never triggers and the result is the reference's.

    ``rank`` must not exceed the rank of ``allowed`` (callers cap it with :func:`free_dims`).
    """
    u, s, _ = torch.linalg.svd(matrix)
    good = int((s > s[0] * _RTOL).sum()) if s.numel() and s[0] > 0 else 0
    if good >= rank:
        return u[:, :rank]
    chosen = u[:, :good]
    rest = allowed - chosen @ (chosen.T @ allowed)
    u_rest, _, _ = torch.linalg.svd(rest)
    return torch.cat([chosen, u_rest[:, : rank - good]], dim=1)


def _clean(vectors: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Remove rounding leakage into the old space and make the columns exactly orthonormal.

    ``allowed @ vectors`` drops any component in the old space; the polar factor ``U W^T`` of its thin SVD is the
    nearest matrix with orthonormal columns, so directions and signs stay those of ``vectors`` (changes at the
    level of rounding for the nearly orthonormal input it gets).
    """
    if vectors.shape[1] == 0:
        return vectors
    u, _, wt = torch.linalg.svd(allowed @ vectors, full_matrices=False)
    return u @ wt


def _rows(vectors: torch.Tensor) -> torch.Tensor:
    """Columns ``vectors`` (d, q) as the rows of ``D`` (q, d), scaled by ``1/sqrt(3)``, contiguous."""
    return (vectors.T * SCALE).contiguous()


def design_down(
    moment: torch.Tensor | None,
    memory: SubspaceMemory,
    rank: int,
    *,
    design: Design = "inflora",
    projection: Projection = "one-sided",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the designed down-projection ``D`` (q, d) in float64.

    * ``"inflora"`` (the method): leading left singular vectors of the new task's second moment with the old
      space removed, ``(I - M M^T) C`` (``projection="one-sided"``, the reference) or ``P C P`` with
      ``P = I - M M^T`` (``"two-sided"``, the paper's form on the input matrix), scaled by ``1/sqrt(3)``.
    * ``"new-task"`` (ablation): from ``C`` without removing the old space.
    * ``"complement"`` (ablation): any ``rank`` orthonormal directions of the old space's complement (no new data).
    * ``"random"`` (SeqLoRA / ablation): PyTorch's default LoRA initialisation, no scaling.

    Number of rows: ``"inflora"`` and ``"complement"`` give ``q = min(rank, free_dims(memory))`` rows, since only
    that many orthonormal directions exist outside the old space; ``q`` may be smaller than ``rank`` (a late task
    whose memory fills the layer) and is 0, a ``(0, d)`` tensor, when the memory spans the whole input space. Their
    rows are exactly orthonormal divided by ``sqrt(3)`` (``3 D D^T = I``) and orthogonal to the old space. When the
    new task's (projected) statistics have fewer than ``q`` non-negligible directions, the rest are filled with
    other directions of the complement. ``"new-task"`` and ``"random"`` ignore the memory and give ``rank`` rows.
    """
    dim = memory.dim
    if rank > dim:
        raise ValueError(f"rank {rank} exceeds the layer's input width {dim}")
    if design == "random":
        return kaiming_down(rank, dim, generator=generator).to(memory.basis.device)
    allowed = memory.new_projector()
    q = min(rank, free_dims(memory))
    if design == "complement":
        return _rows(_clean(_leading_left_vectors(allowed, q, allowed), allowed))
    if moment is None:
        raise ValueError(f"design {design!r} needs the new task's input statistics")
    c = moment.to(device=memory.basis.device, dtype=torch.float64)
    if c.shape != (dim, dim):
        raise ValueError(f"second moment has shape {tuple(c.shape)}, expected ({dim}, {dim})")
    if design == "new-task":
        eye = torch.eye(dim, dtype=torch.float64, device=c.device)
        return _rows(_clean(_leading_left_vectors(c, rank, eye), eye))
    if design != "inflora":
        raise ValueError(f"unknown design {design!r}: expected one of {', '.join(DESIGNS)}")
    if projection == "one-sided":
        c_hat = memory.remove_old(c)
    elif projection == "two-sided":
        c_hat = memory.remove_old_two_sided(c)
    else:
        raise ValueError(f"unknown projection {projection!r}: expected 'one-sided' or 'two-sided'")
    return _rows(_clean(_leading_left_vectors(c_hat, q, allowed), allowed))

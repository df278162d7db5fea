"""A wrapped ``nn.Linear`` that carries per-task low-rank branches on chosen output slices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Branch(nn.Module):
    """One task's low-rank branch ``delta(x) = U (D x)``: ``D`` (r, d_in) down, ``U`` (n_adapted_out, r) up."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, train_down: bool = False) -> None:
        super().__init__()
        if train_down:
            self.down = nn.Parameter(down)
        else:
            self.register_buffer("down", down)
        self.up = nn.Parameter(up)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


class LoRALinear(nn.Module):
    """``nn.Linear`` plus the sum of its active (unmerged) branches, added to ``out_slices`` of the output.

    ``out_slices`` are ``(start, stop)`` ranges of output features that the branches write to; e.g. the k and v
    slices ``[(d, 2d), (2d, 3d)]`` of timm's fused ``qkv``. The up-projection of a branch stacks the rows of all
    slices in order, so one branch holds separate up-projections for k and v as row blocks of one matrix.
    """

    def __init__(self, base: nn.Linear, out_slices: Sequence[tuple[int, int]] | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        slices = [(0, base.out_features)] if out_slices is None else [tuple(map(int, s)) for s in out_slices]
        pos = 0
        for start, stop in slices:
            if not pos <= start < stop <= base.out_features:
                raise ValueError(f"output slices {slices} must be sorted, disjoint and within {base.out_features}")
            pos = stop
        self.out_slices: list[tuple[int, int]] = slices  # type: ignore[assignment]
        self.branches = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def adapted_out(self) -> int:
        """Number of output features that branches write to."""
        return sum(stop - start for start, stop in self.out_slices)

    def add_branch(self, task: int, down: torch.Tensor, train_down: bool = False) -> Branch:
        """Add task ``task``'s branch with down-projection ``down`` and a zero up-projection."""
        key = str(task)
        if key in self.branches:
            raise ValueError(f"task {task} already has a branch")
        weight = self.base.weight
        down = down.detach().to(device=weight.device, dtype=weight.dtype).clone()
        up = torch.zeros(self.adapted_out, down.shape[0], device=weight.device, dtype=weight.dtype)
        branch = Branch(down, up, train_down=train_down)
        self.branches[key] = branch
        return branch

    def branch(self, task: int) -> Branch:
        return self.branches[str(task)]  # type: ignore[return-value]

    def _scatter(self, delta: torch.Tensor) -> torch.Tensor:
        """Place the adapted-output columns of ``delta`` at their slices of the full output (zeros elsewhere)."""
        if len(self.out_slices) == 1:
            start, stop = self.out_slices[0]
            return F.pad(delta, (start, self.out_features - stop))
        pieces, pos, off = [], 0, 0
        lead = delta.shape[:-1]
        for start, stop in self.out_slices:
            if start > pos:
                pieces.append(delta.new_zeros(*lead, start - pos))
            pieces.append(delta[..., off : off + stop - start])
            off += stop - start
            pos = stop
        if pos < self.out_features:
            pieces.append(delta.new_zeros(*lead, self.out_features - pos))
        return torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.branches:
            return out
        delta = None
        for branch in self.branches.values():
            d = F.linear(F.linear(x, branch.down), branch.up)
            delta = d if delta is None else delta + d
        return out + self._scatter(delta)

    @torch.no_grad()
    def merge_branch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold task ``task``'s branch into the frozen weight (``W[slices] += U D``, in float64) and remove it.

        Returns the branch's ``(down, up)`` tensors (detached copies).
        """
        branch = self.branches.pop(str(task))
        down, up = branch.down.detach().clone(), branch.up.detach().clone()
        update = (up.double() @ down.double()).to(self.base.weight.dtype)
        off = 0
        for start, stop in self.out_slices:
            self.base.weight[start:stop] += update[off : off + stop - start]
            off += stop - start
        return down, up

    def extra_repr(self) -> str:
        return f"out_slices={self.out_slices}, branches={list(self.branches.keys())}"


def kaiming_down(rank: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random down-projection as PyTorch's default LoRA initialisation (kaiming-uniform, a=sqrt(5))."""
    bound = 1.0 / math.sqrt(dim)  # kaiming_uniform_ with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return (torch.rand(rank, dim, generator=generator, dtype=torch.float64) * 2 - 1) * bound

"""A generic LoRA layer in the spirit of PEFT: named low-rank branches on a wrapped ``nn.Linear``.

Each branch ``delta(x) = scale * U (D x)`` has a down-projection ``D`` (r, d_in), an up-projection ``U``
(n_adapted_out, r) and a scale (a float, a learnable magnitude, or a magnitude parameter shared with other
branches); each factor is a trainable parameter or a frozen buffer. Branches write to chosen output slices of the
layer (e.g. the k and v thirds of timm's fused ``qkv``), all of them or a subset per branch (e.g. a q-only and a
v-only branch on one fused ``qkv``). A layer routes a batch through its *active* branches (all unmerged ones by
default, or a chosen set), folds any branch into the frozen weight (``merge``, float64) and takes it out again
(``unmerge``). :func:`replace_module` is the one module-replacement helper of the package; :func:`wrap_linears` and
:func:`merged_copy` build on it. InfLoRA, SeqLoRA, joint training, CoLoR, LAE, SD-LoRA, O-LoRA and C-LoRA are
policies on this layer (:func:`use_branches` routes many layers at once).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` of ``model`` (in place). Returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


class LoRABranch(nn.Module):
    """One branch ``scale * U (D x)``. ``down``/``up`` are parameters when trainable, buffers otherwise; ``scale``
    is a float, a parameter with ``learn_scale`` (a learnable magnitude), or a given 0-d ``nn.Parameter`` (a
    magnitude shared by every branch it is given to). ``slices``: indices of the layer's output slices the branch
    writes to (``None``: all of them)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, *, scale: float | nn.Parameter = 1.0,
                 train_down: bool = False, train_up: bool = True, learn_scale: bool = False,
                 slices: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"branch factors must be D (r, d_in) and U (d_out, r); got {tuple(down.shape)} and "
                             f"{tuple(up.shape)}")
        for name, tensor, train in (("down", down, train_down), ("up", up, train_up)):
            if train:
                setattr(self, name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
        self.slices = slices
        if isinstance(scale, nn.Parameter):
            if learn_scale or scale.ndim != 0:
                raise ValueError("a shared magnitude must be a 0-d nn.Parameter, given without learn_scale")
            self.scale: float | nn.Parameter = scale
        elif learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale), dtype=up.dtype, device=up.device))
        else:
            self.scale = float(scale)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def set_trainable(self, down: bool | None = None, up: bool | None = None) -> None:
        """Make a factor trainable (a parameter) or frozen (a buffer); ``None`` leaves it as it is."""
        for name, train in (("down", down), ("up", up)):
            if train is None:
                continue
            tensor = getattr(self, name).detach()
            delattr(self, name)
            if train:
                setattr(self, name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.linear(x, self.down), self.up)
        return out if isinstance(self.scale, float) and self.scale == 1.0 else out * self.scale

    @torch.no_grad()
    def update(self) -> torch.Tensor:
        """The weight update ``scale * U D`` in float64."""
        update = self.up.double() @ self.down.double()
        return update if isinstance(self.scale, float) and self.scale == 1.0 else update * float(self.scale)


class LoRALinear(nn.Module):
    """``nn.Linear`` plus the sum of its active branches, added to ``out_slices`` of the output.

    ``out_slices`` are ``(start, stop)`` ranges of output features the branches write to (default: all). A
    branch's up-projection stacks the rows of all slices in order. Merged branches are kept (detached) in
    ``merged`` so they can be inspected, saved and unmerged.
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
        self.merged: dict[str, LoRABranch] = {}
        self.active: set[str] | None = None

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

    def slice_widths(self, slices: Sequence[int] | None = None) -> int:
        """Number of output features the slices ``slices`` (indices into ``out_slices``; ``None``: all) cover."""
        chosen = self.out_slices if slices is None else [self.out_slices[i] for i in slices]
        return sum(stop - start for start, stop in chosen)

    def _chosen(self, slices: Sequence[int] | None) -> tuple[int, ...] | None:
        if slices is None:
            return None
        chosen = tuple(int(i) for i in slices)
        if not chosen or list(chosen) != sorted(set(chosen)) or not all(0 <= i < len(self.out_slices) for i in chosen):
            raise ValueError(f"slices {list(slices)} must be sorted distinct indices of the layer's "
                             f"{len(self.out_slices)} output slices")
        return None if len(chosen) == len(self.out_slices) else chosen

    def add_branch(self, name: str, down: torch.Tensor, up: torch.Tensor | None = None, *,
                   scale: float | nn.Parameter = 1.0, train_down: bool = False, train_up: bool = True,
                   learn_scale: bool = False, slices: Sequence[int] | None = None) -> LoRABranch:
        """Add branch ``name`` with down-projection ``down`` and ``up`` (default zeros), in the weight's dtype,
        writing to the output slices ``slices`` (indices into ``out_slices``; default all)."""
        if name in self.branches or name in self.merged:
            raise ValueError(f"branch {name!r} already exists")
        chosen = self._chosen(slices)
        rows = self.slice_widths(chosen)
        weight = self.base.weight
        down = down.detach().to(device=weight.device, dtype=weight.dtype).clone()
        if down.ndim != 2 or down.shape[1] != self.in_features:
            raise ValueError(f"down-projection of shape {tuple(down.shape)} does not fit input width "
                             f"{self.in_features}")
        if up is None:
            up = torch.zeros(rows, down.shape[0], device=weight.device, dtype=weight.dtype)
        else:
            up = up.detach().to(device=weight.device, dtype=weight.dtype).clone()
            if tuple(up.shape) != (rows, down.shape[0]):
                raise ValueError(f"up-projection of shape {tuple(up.shape)}, expected ({rows}, {down.shape[0]})")
        branch = LoRABranch(down, up, scale=scale, train_down=train_down, train_up=train_up, learn_scale=learn_scale,
                            slices=chosen)
        self.branches[name] = branch
        return branch

    def branch(self, name: str | int) -> LoRABranch:
        """An unmerged or merged branch by name (an integer ``n`` names branch ``"n"``)."""
        name = str(name)
        if name in self.branches:
            return self.branches[name]  # type: ignore[return-value]
        if name in self.merged:
            return self.merged[name]
        raise KeyError(f"no branch {name!r}; branches: {sorted([*self.branches, *self.merged])}")

    @contextlib.contextmanager
    def use(self, names: Iterable[str] | None) -> Iterator[None]:
        """Route forward passes through the unmerged branches ``names`` only (``None``: all) inside the block."""
        previous, self.active = self.active, None if names is None else set(names)
        try:
            yield
        finally:
            self.active = previous

    def _ranges(self, slices: tuple[int, ...] | None) -> list[tuple[int, int]]:
        return self.out_slices if slices is None else [self.out_slices[i] for i in slices]

    def _scatter(self, delta: torch.Tensor, slices: tuple[int, ...] | None = None) -> torch.Tensor:
        """Place the columns of ``delta`` at their output slices (``slices``: indices, ``None`` all) of the full
        output (zeros elsewhere)."""
        ranges = self._ranges(slices)
        if len(ranges) == 1:
            start, stop = ranges[0]
            return F.pad(delta, (start, self.out_features - stop))
        pieces, pos, off = [], 0, 0
        lead = delta.shape[:-1]
        for start, stop in ranges:
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
        deltas: dict[tuple[int, ...] | None, torch.Tensor] = {}  # summed per set of output slices
        for name, branch in self.branches.items():
            if self.active is not None and name not in self.active:
                continue
            d = branch.delta(x)  # type: ignore[operator]
            key = branch.slices
            deltas[key] = d if key not in deltas else deltas[key] + d
        for key, delta in deltas.items():
            out = out + self._scatter(delta, key)
        return out

    @torch.no_grad()
    def _add_to_weight(self, update: torch.Tensor, sign: float, slices: tuple[int, ...] | None = None) -> None:
        update = update.to(self.base.weight.dtype)
        off = 0
        for start, stop in self._ranges(slices):
            if sign > 0:
                self.base.weight[start:stop] += update[off : off + stop - start]
            else:
                self.base.weight[start:stop] -= update[off : off + stop - start]
            off += stop - start

    @torch.no_grad()
    def merge(self, name: str) -> LoRABranch:
        """Fold branch ``name`` into the frozen weight (``W[slices] += scale * U D``, computed in float64); the
        branch leaves the forward pass and is kept, frozen and detached, in ``merged``. Returns it."""
        if name not in self.branches:
            raise KeyError(f"no unmerged branch {name!r}")
        branch: LoRABranch = self.branches.pop(name)  # type: ignore[assignment]
        self._add_to_weight(branch.update(), +1.0, branch.slices)
        frozen = LoRABranch(branch.down.detach().clone(), branch.up.detach().clone(),
                            scale=float(branch.scale), slices=branch.slices)
        self.merged[name] = frozen
        return frozen

    @torch.no_grad()
    def unmerge(self, name: str, *, train_down: bool = False, train_up: bool = False) -> LoRABranch:
        """Take merged branch ``name`` out of the weight again (equal to before the merge up to float rounding)
        and put it back in the forward pass with the given trainability."""
        if name not in self.merged:
            raise KeyError(f"no merged branch {name!r}")
        frozen = self.merged.pop(name)
        self._add_to_weight(frozen.update(), -1.0, frozen.slices)
        return self.add_branch(name, frozen.down, frozen.up, scale=float(frozen.scale), train_down=train_down,
                               train_up=train_up, slices=frozen.slices)

    def extra_repr(self) -> str:
        return f"out_slices={self.out_slices}, branches={list(self.branches)}, merged={list(self.merged)}"


def wrap_linears(model: nn.Module, layers: Sequence[tuple[str, Sequence[tuple[int, int]] | None]]
                 ) -> list[tuple[str, LoRALinear]]:
    """Wrap each named ``nn.Linear`` of ``model`` (with its output slices) in a :class:`LoRALinear`, in place.

    All or nothing: if one layer cannot be wrapped, the layers wrapped so far are put back and the error raised.
    """
    done: list[tuple[str, LoRALinear]] = []
    try:
        for name, slices in layers:
            base = model.get_submodule(name)
            if isinstance(base, LoRALinear):
                raise ValueError(f"layer {name!r} already carries LoRA branches")
            layer = LoRALinear(base, slices)  # type: ignore[arg-type]
            replace_module(model, name, layer)
            done.append((name, layer))
    except Exception:
        unwrap(model, done)
        raise
    return done


def unwrap(model: nn.Module, layers: Sequence[tuple[str, LoRALinear]]) -> None:
    """Put the wrapped layers' ``base`` Linears back (merged branches stay folded in the weights)."""
    for name, layer in layers:
        replace_module(model, name, layer.base)


@torch.no_grad()
def merged_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every :class:`LoRALinear` folded (all branches) into a plain ``nn.Linear``;
    frozen, in eval mode. ``module`` itself is left untouched."""
    model = copy.deepcopy(module)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        for branch in list(layer.branches):
            layer.merge(branch)
        replace_module(model, name, layer.base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@contextlib.contextmanager
def use_branches(layers: Iterable[LoRALinear], names: Iterable[str] | None) -> Iterator[None]:
    """Route every layer of ``layers`` through its unmerged branches among ``names`` (``None``: all) inside the
    block (:meth:`LoRALinear.use` on each)."""
    chosen = None if names is None else list(names)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.use(chosen))
        yield


def kaiming_down(rank: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random down-projection as PyTorch's default LoRA initialisation (kaiming-uniform, a=sqrt(5)), float64."""
    bound = 1.0 / math.sqrt(dim)  # kaiming_uniform_ with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return (torch.rand(rank, dim, generator=generator, dtype=torch.float64) * 2 - 1) * bound

"""The shared base of the LoRA-family baselines (``sdlora``, ``olora``, ``clora``): a new LoRA pair per task on
every adapted *projection*.

A projection is one adapted output of a layer: a whole ``nn.Linear`` (BERT's ``query``, ``value``), or one output
slice of a fused layer (the q or v third of timm's ``attn.qkv``). As in the reference codes, each projection gets its
own down-projection ``A`` (Kaiming-uniform, PyTorch's LoRA initialisation) and up-projection ``B`` (zeros), both
trained, so q and v of one block never share ``A``. The policies differ in what they do with finished pairs
(normalise and re-weight, merge) and in the penalty their training step adds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..adapter.options import RankOptions, TargetOptions
from ..adapter.targets import find_sites
from ..config import opt
from ..lora import LoRABranch, LoRALinear, kaiming_down, wrap_linears
from ..runtime import Purpose, derive_seed
from .base import Learner, LearnerSetup, TaskContext


@dataclass
class FamilyOptions(TargetOptions, RankOptions):
    """Where the per-task LoRA pairs go and their rank."""

    preset: str | None = opt(None, "layer preset (default: the backbone's query and value projections, "
                                   "timm-vit-qv or bert-qv, as the reference codes)")

    def validate(self) -> None:
        TargetOptions.validate(self)
        RankOptions.validate(self)


@dataclass(frozen=True)
class Projection:
    """One adapted projection: ``layer`` and the index ``slot`` of its output slice (``None``: its only slice)."""

    name: str
    layer: LoRALinear
    slot: int | None

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.slice_widths(None if self.slot is None else [self.slot])

    def branch_name(self, task: int) -> str:
        return str(task) if self.slot is None else f"{task}_{self.slot}"

    def branch(self, task: int) -> LoRABranch:
        """Task ``task``'s branch on this projection (unmerged or merged)."""
        return self.layer.branch(self.branch_name(task))

    def add(self, task: int, down: torch.Tensor, up: torch.Tensor | None = None, *, train: bool = True,
            scale: float | nn.Parameter = 1.0) -> LoRABranch:
        """Add task ``task``'s branch (both factors trained when ``train``)."""
        return self.layer.add_branch(self.branch_name(task), down, up, scale=scale, train_down=train, train_up=train,
                                     slices=None if self.slot is None else [self.slot])


def attach_projections(backbone: nn.Module, options: FamilyOptions) -> list[Projection]:
    """Wrap the layers ``options`` names (a preset, by default the backbone's ``qv_preset``, or a target regex) and
    list their projections, one per output slice, in module order."""
    if options.targets:
        sites = find_sites(backbone, targets=options.targets, blocks=options.blocks)
    else:
        preset = options.preset or getattr(backbone, "qv_preset", None)
        if preset is None:
            raise ValueError(f"{type(backbone).__name__} names no query/value preset (qv_preset): set the method's "
                             "preset or targets")
        sites = find_sites(backbone, preset=preset, blocks=options.blocks)
    layers = [(n, s) for site in sites for n, s in zip(site.layers, site.slices, strict=True)]
    for name, _ in layers:
        width = backbone.get_submodule(name).in_features
        if options.rank > width:
            raise ValueError(f"rank {options.rank} exceeds the input width {width} of layer {name!r}")
    projections = []
    for (name, slices), (_, layer) in zip(layers, wrap_linears(backbone, layers), strict=True):
        for slot in range(len(slices)):
            single = len(slices) == 1
            projections.append(Projection(name if single else f"{name}[{slot}]", layer, None if single else slot))
    return projections


class PerTaskLoRALearner(Learner):
    """A new trained LoRA pair on every projection per task; finished pairs merge into the weights when
    ``merges`` (their factors stay readable for penalties and state). Subclasses set the branches' scale
    (:meth:`branch_scale`) and add their penalty or re-weighting."""

    merges: ClassVar[bool] = True

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        self.family_options: FamilyOptions = setup.options or self.options_type()  # type: ignore[misc]
        self.rank = self.family_options.rank
        self.projections = attach_projections(self.backbone, self.family_options)
        self.generator = torch.Generator()

    def branch_scale(self, task: int) -> float | nn.Parameter:
        """The scale of task ``task``'s branches (a float, or a magnitude parameter)."""
        return 1.0

    def current(self) -> Iterator[tuple[Projection, LoRABranch]]:
        """Every projection with the current task's branch."""
        assert self.current_task is not None
        for projection in self.projections:
            yield projection, projection.branch(self.current_task)

    def adapter_parameters(self) -> list[nn.Parameter]:
        if not self.in_task:
            return []
        return [p for _, branch in self.current() for p in (branch.down, branch.up)]

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        self.generator.manual_seed(derive_seed(ctx.seed, ctx.index, Purpose.DESIGN))
        scale = self.branch_scale(ctx.index)
        for projection in self.projections:
            down = kaiming_down(self.rank, projection.in_features, generator=self.generator)
            projection.add(ctx.index, down, scale=scale)

    def end_task(self, ctx: TaskContext) -> None:
        if self.merges:
            for projection in self.projections:
                projection.layer.merge(projection.branch_name(ctx.index))
        super().end_task(ctx)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for i, projection in enumerate(self.projections):
            for t in range(self.tasks_done):
                branch = projection.branch(t)
                state[f"lora.{i}.{t}.down"] = branch.down.detach().cpu().clone()
                state[f"lora.{i}.{t}.up"] = branch.up.detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        for i, projection in enumerate(self.projections):
            for t in range(self.tasks_done):
                try:
                    down, up = state[f"lora.{i}.{t}.down"], state[f"lora.{i}.{t}.up"]
                except KeyError as exc:
                    raise ValueError(f"learner state has no LoRA factor {exc} (projection {projection.name}, "
                                     f"task {t})") from None
                projection.add(t, down, up, train=False, scale=self.branch_scale(t))
                if self.merges:
                    projection.layer.merge(projection.branch_name(t))

    def estimate_state_bytes(self) -> int:
        per_task = sum(4 * self.rank * (p.in_features + p.out_features) for p in self.projections)
        return super().estimate_state_bytes() + per_task * self.num_tasks

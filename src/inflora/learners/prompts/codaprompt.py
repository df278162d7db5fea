"""``codaprompt``: CODA-Prompt (Smith et al., CVPR 2023) as the InfLoRA reference runs it: at each prompted block,
components with keys and attention vectors; the prefix is the sum of components weighted by
``cos(query * A_m, K_m)``; each task adds its own slice of components (Gram-Schmidt initialised, orthogonal to the
earlier ones) and trains only that slice; an optional orthogonality penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import opt
from ...runtime import Purpose, derive_seed
from ..base import LearnerSetup, TaskContext, register_learner
from .base import PromptLearner, PromptOptions, check_blocks, check_length
from .matching import ortho_penalty, orthonormal_rows, prefix_halves

KINDS = ("keys", "attention", "prompts")


@dataclass
class CodaPromptOptions(PromptOptions):
    """Options of ``codaprompt`` (defaults: the reference's ImageNet-R setting, CODA-Prompt's scripts)."""

    pool: int = opt(100, "components M per block; each task adds M // tasks of them (the rest stay unused)")
    length: int = opt(8, "rows per component: L/2 key + L/2 value rows (even)")
    blocks: list[int] = opt([0, 1, 2, 3, 4], "0-based prefixed blocks")
    ortho: float = opt(0.0, "weight mu of the orthogonality penalty mu * mean((B B^T - I)^2) of keys, attention "
                            "vectors and flattened components (0: CODA-P's scripts and the InfLoRA harness)")

    def validate(self) -> None:
        PromptOptions.validate(self)
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        check_length("length", self.length)
        check_blocks("blocks", self.blocks)
        if not self.ortho >= 0:
            raise ValueError(f"ortho must be >= 0, got {self.ortho}")


def component_weights(query: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
    """``(B, M)`` weights ``alpha_m = cos(q * A_m, K_m)`` (elementwise product, then cosine; no softmax, no top-k)
    without forming the ``(B, M, D)`` product: ``q . (A_m * K_m / |K_m|) / |q * A_m|``."""
    q = query.float()
    numerator = q @ (attention * F.normalize(keys, dim=-1)).T
    norm = (q.pow(2) @ attention.pow(2).T).clamp(min=1e-24).sqrt()  # |q * A_m|, as F.normalize's eps 1e-12
    return numerator / norm


@register_learner("codaprompt")
class CodaPromptLearner(PromptLearner):
    """CODA-Prompt: per block, per task ``t`` a slice of ``pool // tasks`` components ``(length, D)``, keys and
    attention vectors ``(D_query,)``, drawn at the task's start as unit rows orthogonal to every earlier row (float64,
    seeded per task); task ``t`` trains its slice only (earlier slices stay frozen), training and test use the slices
    ``0..t`` (the test after task ``upto``: ``0..upto``)."""

    options_type = CodaPromptOptions
    options: CodaPromptOptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o = self.options
        self.check_blocks_exist("blocks", o.blocks)
        self.per_task = o.pool // self.num_tasks
        if self.per_task < 1:
            raise ValueError(f"codaprompt.pool={o.pool} gives no component to each of {self.num_tasks} tasks")
        used, width = self.per_task * self.num_tasks, min(self.query_dim, o.length * self.width)
        if used > width:
            raise ValueError(f"codaprompt.pool={o.pool}: {used} orthogonal rows of width {width} cannot exist "
                             f"(Gram-Schmidt needs components in use <= the key width); use pool <= {width}")
        self.slices = 0  # tasks whose components exist

    def name_of(self, kind: str, block: int, task: int) -> str:
        return f"b{block}_{kind}_t{task}"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        p, o = self.per_task, self.options
        return {"keys": (p, self.query_dim), "attention": (p, self.query_dim), "prompts": (p, o.length, self.width)}

    def stacked(self, kind: str, block: int, upto: int) -> Tensor:
        """Rows of slices ``0..upto`` of ``kind`` at ``block``."""
        if upto < 0 or upto >= self.slices:
            raise RuntimeError(f"codaprompt has components for {self.slices} task(s), asked for tasks 0..{upto}")
        return torch.cat([self.store[self.name_of(kind, block, t)] for t in range(upto + 1)])

    @torch.no_grad()
    def add_slice(self, task: int) -> None:
        """Draw task ``task``'s components: per block and kind, unit rows orthogonal to the earlier rows."""
        if task != self.slices:
            raise RuntimeError(f"codaprompt: components of task {task} requested after {self.slices} task(s)")
        generator = torch.Generator().manual_seed(derive_seed(self.seed, task, Purpose.PROMPTS))
        for block in self.options.blocks:
            for kind, shape in self.shapes().items():
                width = math.prod(shape[1:])
                old = (self.stacked(kind, block, task - 1).reshape(-1, width) if task else
                       torch.zeros(0, width, device=self.device))
                rows = orthonormal_rows(old.double(), self.per_task, generator).float()
                self.add_parameter(self.name_of(kind, block, task), value=rows.reshape(shape))
        self.slices = task + 1

    def prepare_state(self, tasks_done: int) -> None:
        for task in range(self.slices, tasks_done):
            for block in self.options.blocks:
                for kind, shape in self.shapes().items():
                    self.add_parameter(self.name_of(kind, block, task), value=torch.zeros(shape))
            self.slices = task + 1

    def final_parameter_count(self) -> int:
        per_block = sum(math.prod(s) for s in self.shapes().values())
        return per_block * len(self.options.blocks) * self.num_tasks

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        self.add_slice(ctx.index)

    def end_task(self, ctx: TaskContext) -> None:
        self.task_diagnostics["components_per_block"] = self.per_task * (ctx.index + 1)
        super().end_task(ctx)

    def trainable(self, ctx: TaskContext) -> list[nn.Parameter]:
        return [self.store[self.name_of(kind, b, ctx.index)] for b in self.options.blocks for kind in KINDS]

    def prompt_features(self, inputs: Any, query: Tensor, upto: int) -> Tensor:
        prefixes = {}
        for block in self.options.blocks:
            keys, attention, prompts = (self.stacked(kind, block, upto) for kind in KINDS)
            alpha = component_weights(query, keys, attention)
            prefixes[block] = prefix_halves(torch.einsum("bm,mld->bld", alpha, prompts))
        return self.prompted(inputs, prefixes=prefixes)

    def penalty(self, upto: int) -> Tensor:
        """Sum over blocks of the orthogonality penalty of keys, attention vectors and flat components in use."""
        terms = [ortho_penalty(self.stacked(kind, block, upto).flatten(1)) for block in self.options.blocks
                 for kind in KINDS]
        return torch.stack(terms).sum()

    def train_features(self, inputs: Any, query: Tensor, ctx: TaskContext
                       ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        features = self.prompt_features(inputs, query, ctx.index)
        if self.options.ortho <= 0:
            return features, None, {}
        penalty = self.penalty(ctx.index)
        return features, self.options.ortho * penalty, {"ortho": penalty}

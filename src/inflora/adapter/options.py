"""Typed options of LoRA-family methods, each field defined once: where to adapt (:class:`TargetOptions`), how
InfLoRA designs and remembers (:class:`DesignOptions`). The method sections of the run config compose them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import opt
from .design import DESIGNS


@dataclass
class TargetOptions:
    """Which layers carry the low-rank branches."""

    preset: str | None = opt(None, "layer preset (default: the backbone's, timm-vit-kv or bert-kv)")
    targets: str | None = opt(None, "regex of nn.Linear names to adapt instead of a preset")
    blocks: int | None = opt(None, "adapt only the first N blocks (the paper's b5: 5)")

    def validate(self) -> None:
        if self.blocks is not None and self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")


@dataclass
class RankOptions:
    """The rank of each task's branch."""

    rank: int = opt(10, "rank r of each task's branch")

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise ValueError(f"rank must be an integer, got {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


@dataclass
class DesignOptions(RankOptions):
    """How InfLoRA designs D_t and grows its subspace memory (defaults: faithful to the reference)."""

    lamb: float = opt(0.95, "memory energy threshold at the first task (eps_0)")
    lame: float = opt(1.0, "threshold the schedule moves towards: eps_t = lamb + (lame - lamb) * t / T")
    memory: Literal["dualgpm", "gpm"] = opt("dualgpm", "DualGPM (basis or complement, switching at d/2) or plain GPM")
    energy: Literal["faithful", "gpm"] = opt("faithful", "energy rule: faithful (S**2 of the second moment, the "
                                                         "reference) or gpm (classic GPM: S(H)**2)")
    projection: Literal["one-sided", "two-sided"] = opt("one-sided", "old-space removal before the design SVD: "
                                                                     "one-sided (reference) or two-sided (paper)")
    design: Literal["inflora", "random", "new-task", "complement"] = opt(
        "inflora", "down-projection design: inflora, or the ablations random, new-task, complement")

    def validate(self) -> None:
        super().validate()
        for name in ("lamb", "lame"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
        choices = {"memory": ("dualgpm", "gpm"), "energy": ("faithful", "gpm"),
                   "projection": ("one-sided", "two-sided"), "design": DESIGNS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")


@dataclass
class InfLoRAConfig(DesignOptions):
    """Everything the adapter itself needs: the design options plus the schedule length and switches."""

    num_tasks: int | None = opt(None, "total number of tasks T of the threshold schedule (None: lamb throughout)")
    train_down: bool = opt(False, "ablation: also train D_t (plain LoRA inside the adapter)")
    update_memory: bool = opt(True, "grow the memory after each task (False: no protection, an ablation)")
    merge: bool = opt(True, "merge each finished task's branch into the frozen weight")

    def validate(self) -> None:
        super().validate()
        if self.num_tasks is not None and (isinstance(self.num_tasks, bool) or self.num_tasks < 1):
            raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")

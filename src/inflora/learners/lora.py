"""LoRA-family policies on the generic LoRA layer: ``inflora`` (statistics -> design -> memory), ``seqlora``
(plain LoRA per task, merged, no protection) and ``joint`` (plain LoRA on all data so far, the upper bound)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..adapter import EnergyMeter, InfLoRAAdapter, InfLoRAConfig, StatsCollector, attach, find_sites
from ..adapter.options import DesignOptions, RankOptions, TargetOptions
from ..batches import attention_mask_of
from ..config import opt
from ..lora import LoRALinear, kaiming_down, wrap_linears
from ..runtime import Purpose, derive_seed
from .base import Learner, LearnerSetup, TaskContext, register_learner


def _preset(options: TargetOptions, backbone: nn.Module) -> str | None:
    return None if options.targets else (options.preset or getattr(backbone, "adapter_preset", None))


def wrap_sites(backbone: nn.Module, options: TargetOptions, rank: int) -> list[list[LoRALinear]]:
    """Wrap the layers ``options`` choose (a preset, the backbone's by default, or a regex; the first ``blocks``)
    in :class:`LoRALinear`, per site (layers sharing an input); ``rank`` must fit every layer's input width."""
    specs = find_sites(backbone, preset=_preset(options, backbone), targets=options.targets, blocks=options.blocks)
    for spec in specs:
        for name in spec.layers:
            width = backbone.get_submodule(name).in_features
            if rank > width:
                raise ValueError(f"rank {rank} exceeds the input width {width} of layer {name!r}")
    wrapped = dict(wrap_linears(backbone, [(n, s) for spec in specs for n, s in zip(spec.layers, spec.slices,
                                                                                     strict=True)]))
    return [[wrapped[n] for n in spec.layers] for spec in specs]


def add_task_branches(sites: list[list[LoRALinear]], name: str, rank: int, generator: torch.Generator) -> None:
    """A new plain LoRA branch ``name`` on every layer: per site one random down-projection (PyTorch's default LoRA
    initialisation, shared by the site's layers as their starting point), zero up-projections; both trained."""
    for site in sites:
        down = kaiming_down(rank, site[0].in_features, generator=generator)
        for layer in site:
            layer.add_branch(name, down, train_down=True)


_PRODUCTS = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class InfLoRAOptions(TargetOptions, DesignOptions):
    """Options of the ``inflora`` method: where to adapt, how to design and remember, statistics budget."""

    stats_samples: int | None = opt(None, "training samples per task in the design statistics pass (None: all); "
                                          "the memory pass uses the same subsample unless it is fused with the "
                                          "classifier's feature pass")
    stats_products: Literal["float32", "float64"] = opt(
        "float32", "precision of each batch's input product x^T x in the statistics hooks (the sums over batches "
                   "are float64 either way): float32 halves the hooks' cost on CPU; its rounding (about 1e-7 of a "
                   "moment's norm) can move a direction whose energy sits exactly at the memory threshold, so use "
                   "float64 where runs must agree bit for bit across process counts")
    energy_meter: bool = opt(True, "after each task, report per layer the share of every old task's input energy "
                                   "outside the memory (diagnostics energy_outside; keeps a factor of each task's "
                                   "input statistics in the learner state)")
    meter_tolerance: float = opt(1e-3, "energy meter: share of a task's input energy its stored factor may drop; the "
                                       "reported shares overstate the true ones by at most this (0: exact)")

    def validate(self) -> None:
        TargetOptions.validate(self)
        DesignOptions.validate(self)
        if self.stats_samples is not None and self.stats_samples < 1:
            raise ValueError(f"stats_samples must be >= 1 or null, got {self.stats_samples}")
        if self.stats_products not in _PRODUCTS:
            raise ValueError(f"stats_products must be one of {sorted(_PRODUCTS)}, got {self.stats_products!r}")
        tol = self.meter_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < 1.0:
            raise ValueError(f"meter_tolerance must lie in [0, 1), got {tol!r}")


@register_learner("inflora")
class InfLoRALearner(Learner):
    """InfLoRA: per task, a down-projection designed from the task's input statistics outside the old tasks'
    input space (frozen), a trained up-projection; the subspace memory grows after the task; branches merge."""

    options_type = InfLoRAOptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o: InfLoRAOptions = setup.options or InfLoRAOptions()
        design = {k: getattr(o, k) for k in ("rank", "lamb", "lame", "memory", "energy", "projection", "design")}
        self.adapter: InfLoRAAdapter = attach(self.backbone, _preset(o, self.backbone), targets=o.targets,
                                              blocks=o.blocks, config=InfLoRAConfig(**design,
                                                                                    num_tasks=setup.num_tasks))
        self.adapter.generator = torch.Generator()
        self.stats_samples = o.stats_samples
        self.stats_products = _PRODUCTS[o.stats_products]
        self.meter = EnergyMeter(o.meter_tolerance) if o.energy_meter else None

    def adapter_parameters(self) -> list[nn.Parameter]:
        return self.adapter.trainable_parameters()

    def _collector(self) -> StatsCollector:
        return StatsCollector(self.adapter, products=self.stats_products)

    def _collect(self, batches: Any, key: str) -> Any:
        """Input statistics of ``batches`` (eval mode, no gradients), timed into ``key``."""
        with self.runtime.timer(self.task_diagnostics, key), self._collector() as collector:
            self.feature_pass(batches, before=lambda inputs: collector.set_mask(attention_mask_of(inputs)))
        return collector.result()

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        assert self.adapter.generator is not None
        self.adapter.generator.manual_seed(derive_seed(ctx.seed, ctx.index, Purpose.DESIGN))
        needs_stats = self.adapter.config.design in ("inflora", "new-task")
        stats = self._collect(ctx.train_pass(self.stats_samples, "design"), "stats_s") if needs_stats else None
        with self.runtime.timer(self.task_diagnostics, "design_s"):
            self.adapter.begin_task(stats)

    def _fused_pass(self, ctx: TaskContext) -> Any:
        """One pass over all of the task's training samples that feeds both the classifier (features) and the
        memory (input statistics); only the hooks' time counts as InfLoRA's."""
        with self.runtime.timer(self.task_diagnostics, "features_s"), self._collector() as collector:
            self.feature_pass(ctx.feature_pass(), lambda f, y: self.classifier.observe(f, y, ctx.index),
                              before=lambda inputs: collector.set_mask(attention_mask_of(inputs)))
        self.task_diagnostics["stats_s"] = self.task_diagnostics.get("stats_s", 0.0) + collector.seconds
        return collector.result()

    def end_task(self, ctx: TaskContext) -> None:
        fused = self.classifier.needs_features and ctx.same_inputs
        if fused:  # text: the memory pass and the classifier's feature pass read the same samples
            stats = self._fused_pass(ctx)
        else:
            stats = self._collect(ctx.train_pass(self.stats_samples, "memory"), "stats_s")
        with self.runtime.timer(self.task_diagnostics, "memory_s"):
            added = self.adapter.end_task(stats)
        self.finish_task(ctx, observed=fused)
        d = self.task_diagnostics
        if self.meter is not None:  # a diagnostic: its time is not the method's
            with self.runtime.timer(d, "meter_s"):
                d["meter_dims"] = self.meter.record(ctx.index, stats)
                d.update(self.meter.report(self.adapter, ctx.index))
        d["method_s"] = d.get("stats_s", 0.0) + d.get("design_s", 0.0) + d.get("memory_s", 0.0)
        d["memory_dims"] = {k: list(v) for k, v in self.adapter.memory_dims().items()}
        d["memory_spans"] = self.adapter.memory_spans()
        d["memory_added"] = added
        d["short_sites"] = dict(self.adapter.short[-1]) if self.adapter.short else {}
        d["memory_pass"] = "fused with the classifier's feature pass" if fused else "separate"

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {**super().state_dict(), **{f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}}
        if self.meter is not None:
            state.update({f"meter.{k}": v for k, v in self.meter.state_dict(list(self.adapter.sites)).items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
        if self.meter is not None:  # a state without meter entries (meter off, or older) leaves those tasks unmeasured
            self.meter.load_state_dict({k[len("meter."):]: v for k, v in state.items() if k.startswith("meter.")},
                                       list(self.adapter.sites), [s.dim for s in self.adapter.sites.values()])

    def estimate_state_bytes(self) -> int:
        total, rank = super().estimate_state_bytes(), self.adapter.config.rank
        for site in self.adapter.sites.values():
            total += 8 * site.dim * site.dim
            if self.meter is not None:  # float32 factors of at most d columns per task, and a trace
                total += (4 * site.dim * site.dim + 8) * self.num_tasks
            total += sum(4 * rank * (layer.in_features + layer.adapted_out) for _, layer in site.layers) * \
                self.num_tasks
        return total

    def export_parts(self, upto: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        if self.adapter.in_task:
            raise RuntimeError("the learner is in the middle of a task: export after the task has ended")
        return super().export_parts(upto)


@dataclass
class LoRAOptions(TargetOptions, RankOptions):
    """Options of plain LoRA policies: where to adapt and the rank."""

    def validate(self) -> None:
        TargetOptions.validate(self)
        RankOptions.validate(self)


@register_learner("seqlora")
class SeqLoRALearner(Learner):
    """SeqLoRA: plain LoRA on the same layers, a new branch per task (PyTorch's default random D, zero U, both
    trained), merged after the task; no memory, so nothing protects old tasks."""

    options_type = LoRAOptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o: LoRAOptions = setup.options or LoRAOptions()
        self.rank = o.rank
        self.sites: list[list[LoRALinear]] = wrap_sites(self.backbone, o, o.rank)
        self.generator = torch.Generator()

    def layers(self) -> list[LoRALinear]:
        return [layer for site in self.sites for layer in site]

    def adapter_parameters(self) -> list[nn.Parameter]:
        if not self.in_task:
            return []
        name = str(self.current_task)
        return [p for layer in self.layers() for p in (layer.branch(name).down, layer.branch(name).up)]

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        self.generator.manual_seed(derive_seed(ctx.seed, ctx.index, Purpose.DESIGN))
        add_task_branches(self.sites, str(ctx.index), self.rank, self.generator)

    def end_task(self, ctx: TaskContext) -> None:
        for layer in self.layers():
            layer.merge(str(ctx.index))
        super().end_task(ctx)

    def estimate_state_bytes(self) -> int:
        per_task = sum(4 * self.rank * (layer.in_features + layer.adapted_out) for layer in self.layers())
        return super().estimate_state_bytes() + per_task * self.num_tasks

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for i, layer in enumerate(self.layers()):
            for name, branch in layer.merged.items():
                state[f"lora.layer{i}.{name}.down"] = branch.down.cpu().clone()
                state[f"lora.layer{i}.{name}.up"] = branch.up.cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        for i, layer in enumerate(self.layers()):
            for t in range(self.tasks_done):
                try:
                    down, up = state[f"lora.layer{i}.{t}.down"], state[f"lora.layer{i}.{t}.up"]
                except KeyError as exc:
                    raise ValueError(f"learner state has no LoRA branch {exc} for task {t}") from None
                layer.add_branch(str(t), down, up, train_down=False, train_up=False)
                layer.merge(str(t))


@register_learner("joint")
class JointLearner(SeqLoRALearner):
    """Upper bound: plain LoRA trained on all data seen so far, cross-entropy over all seen classes, every seen
    head trained."""

    replays_past = True

"""The InfLoRA adapter: a policy on the generic LoRA layer (:mod:`inflora.lora`). Per site it collects nothing
itself; it designs each task's down-projection from statistics, keeps the subspace memory, merges, saves and loads."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields

import torch
from torch import nn

from ..lora import LoRALinear, unwrap, wrap_linears
from .checks import check_state
from .design import design_down
from .memory import SubspaceMemory, threshold
from .options import InfLoRAConfig
from .site import Site
from .targets import find_sites

log = logging.getLogger("inflora")

STATE_FORMAT = 1


class InfLoRAAdapter:
    """InfLoRA attached to a model. Create it with :func:`attach`.

    Task life cycle: ``begin_task(stats)`` designs ``D_t`` per site and adds zero ``U_t`` (the only trainable
    adapter parameters); train with any loop; ``end_task(stats)`` grows the memory and merges the branch.
    """

    def __init__(self, model: nn.Module, sites: list[Site], config: InfLoRAConfig, preset: str | None,
                 targets: str | Sequence[str] | None, blocks: int | Sequence[int] | None) -> None:
        self.model = model
        self.sites: dict[str, Site] = {s.name: s for s in sites}
        self.config = config
        self.target_spec = {"preset": preset, "targets": targets, "blocks": blocks}
        self.task = 0  # number of finished tasks
        self.in_task = False
        self.merged: list[bool] = []
        self.added: list[dict[str, int]] = []  # directions added to each site's memory, per finished task
        self.generator: torch.Generator | None = None
        self.short: list[dict[str, int]] = []  # per task: sites whose D_t got fewer than `rank` rows (rows given)

    # ------------------------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(iter(self.sites.values())).stats_layer.base.weight.device

    @property
    def current_task(self) -> int:
        """Index of the task being trained (or about to be)."""
        return self.task

    def layers(self) -> dict[str, LoRALinear]:
        """All wrapped layers by module name."""
        return {name: layer for site in self.sites.values() for name, layer in site.layers}

    def threshold(self, task: int | None = None) -> float:
        """Memory threshold ``eps_t`` of ``task`` (default: the current one)."""
        t = self.task if task is None else task
        return threshold(t, self.config.num_tasks, self.config.lamb, self.config.lame)

    def memory_dims(self) -> dict[str, tuple[str, int]]:
        """``{site: (mode, stored basis columns)}``; mode is "basis" or "complement"."""
        return {name: (s.memory.mode, s.memory.size) for name, s in self.sites.items()}

    def memory_spans(self) -> dict[str, int]:
        """``{site: dimension of the old tasks' input space held}`` (whatever the mode)."""
        return {name: s.memory.memory_dim for name, s in self.sites.items()}

    def old_space(self, name: str) -> torch.Tensor:
        """Orthonormal basis (d x k, float64) of the old tasks' input space held for site ``name``, whatever the
        memory's mode (in complement mode it is computed from the stored complement)."""
        if name not in self.sites:
            raise KeyError(f"no site {name!r}; sites: {list(self.sites)[:4]}... ({len(self.sites)})")
        memory = self.sites[name].memory
        if memory.mode == "basis":
            return memory.basis.clone()
        u, _, _ = torch.linalg.svd(memory.basis, full_matrices=True)
        return u[:, memory.size :].contiguous()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The current task's trainable adapter parameters (``U_t``; also ``D_t`` with ``train_down``)."""
        if not self.in_task:
            return []
        params: list[nn.Parameter] = []
        for site in self.sites.values():
            for _, layer in site.layers:
                branch = layer.branch(str(self.task))
                params.append(branch.up)
                if isinstance(branch.down, nn.Parameter):
                    params.append(branch.down)
        return params

    def _check_stats(self, stats: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(stats, Mapping):
            raise TypeError(f"stats must be a mapping site -> second moment, got {type(stats).__name__}")
        missing = sorted(set(self.sites) - set(stats))
        unexpected = sorted(set(stats) - set(self.sites))
        if missing or unexpected:
            raise ValueError(f"stats do not belong to this adapter's model: missing sites {missing[:5]}, "
                             f"unexpected sites {unexpected[:5]} (collect them with collect_input_stats on this "
                             "model and adapter)")
        for name, site in self.sites.items():
            shape = tuple(stats[name].shape)
            if shape != (site.dim, site.dim):
                raise ValueError(f"stats for site {name!r} have shape {shape}, expected ({site.dim}, {site.dim})")
            if not torch.isfinite(stats[name]).all():
                raise ValueError(f"stats for site {name!r} contain NaN or inf")

    # ------------------------------------------------------------------------------------------------ tasks
    def begin_task(self, stats: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Design ``D_t`` for every site, add zero-initialised ``U_t`` and make only the new branch trainable.

        ``stats`` are the new task's input statistics (:func:`collect_input_stats` with the current model); the
        "random" and "complement" designs do not need them. Returns the designed ``{site: D_t}``.
        """
        if self.in_task:
            raise RuntimeError(f"task {self.task} has begun and not ended: call end_task first")
        if self.config.num_tasks is not None and self.task >= self.config.num_tasks:
            raise RuntimeError(f"all {self.config.num_tasks} tasks of the schedule are done")
        needs_stats = self.config.design in ("inflora", "new-task")
        if needs_stats:
            if stats is None:
                raise ValueError(f"design {self.config.design!r} needs the new task's input statistics")
            self._check_stats(stats)
        for layer in self.layers().values():
            for p in layer.parameters():
                p.requires_grad_(False)
        designed, short = {}, {}
        for name, site in self.sites.items():
            moment = stats[name] if needs_stats and stats is not None else None
            down = design_down(moment, site.memory, self.config.rank, design=self.config.design,
                               projection=self.config.projection, generator=self.generator)
            down = down.to(dtype=site.stats_layer.base.weight.dtype)
            if down.shape[0] < self.config.rank:
                short[name] = int(down.shape[0])
            site.downs.append(down)
            for _, layer in site.layers:
                branch = layer.add_branch(str(self.task), down, train_down=self.config.train_down)
                for p in branch.parameters():
                    p.requires_grad_(True)
            designed[name] = down
        if short and not any(self.short):
            log.warning("InfLoRA task %d: %d site(s) have fewer than rank=%d free directions outside the old tasks' "
                        "input space (e.g. %s: %d); their branches use only those (see the diagnostics' short_sites)",
                        self.task, len(short), self.config.rank, next(iter(short)), next(iter(short.values())))
        self.short.append(short)
        self.in_task = True
        return designed

    def end_task(self, stats: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
        """Finish the current task: grow each site's memory with ``stats`` (the task's input statistics with the
        trained branch) at threshold ``eps_t``, freeze the branch and merge it (``config.merge``).

        Returns ``{site: directions added to its old space}``.
        """
        if not self.in_task:
            raise RuntimeError("no task in progress: call begin_task first")
        added = {name: 0 for name in self.sites}
        if self.config.update_memory:
            if stats is None:
                raise ValueError("end_task needs the task's input statistics to update the memory")
            self._check_stats(stats)
            eps = self.threshold()
            for name, site in self.sites.items():
                added[name] = site.memory.update(stats[name], eps)
        for layer in self.layers().values():
            for p in layer.branch(str(self.task)).parameters():
                p.requires_grad_(False)
        self.merged.append(False)
        self.added.append(added)
        self.in_task = False
        self.task += 1
        if self.config.merge:
            self.merge_branches()
        return added

    @torch.no_grad()
    def merge_branches(self) -> int:
        """Merge every finished, unmerged branch into its frozen weight (in task order). Returns how many."""
        count = 0
        for t in range(self.task):
            if self.merged[t]:
                continue
            for layer in self.layers().values():
                layer.merge(str(t))
            self.merged[t] = True
            count += 1
        return count

    def branch_tensors(self, site: str, task: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(D, U)`` of task ``task``'s branch for each layer of ``site``, merged or not."""
        out = []
        for _, layer in self.sites[site].layers:
            branch = layer.branch(str(task))
            out.append((branch.down.detach(), branch.up.detach()))
        return out

    # ------------------------------------------------------------------------------------------------ export
    @torch.no_grad()
    def detach(self) -> nn.Module:
        """Merge all finished branches and put the plain ``nn.Linear`` layers back. Returns the model.

        The adapter is unusable afterwards. Call between tasks only.
        """
        if self.in_task:
            raise RuntimeError("cannot detach during a task: call end_task first")
        self.merge_branches()
        for site in self.sites.values():
            unwrap(self.model, site.layers)
        self.sites = {}
        return self.model

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the adapter owns, as tensors only: config, task counter, per site the memory (basis and
        mode), designed down-projections and up-projections of every branch, merged flags.

        Keys: ``meta`` (JSON as uint8), ``site{i}.memory``, ``site{i}.layer{j}.down{t}``, ``site{i}.layer{j}.up{t}``.
        """
        n_branches = self.task + (1 if self.in_task else 0)
        meta = {
            "format": STATE_FORMAT,
            "config": asdict(self.config),
            "target_spec": self.target_spec,
            "sites": [{"name": s.name, "layers": [n for n, _ in s.layers], "dim": s.dim,
                       "mode": s.memory.mode} for s in self.sites.values()],
            "task": self.task,
            "in_task": self.in_task,
            "merged": self.merged,
            "added": self.added,
            "short": self.short,
        }
        state = {"meta": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}
        for i, site in enumerate(self.sites.values()):
            state[f"site{i}.memory"] = site.memory.basis.detach().cpu().clone()
            for t in range(n_branches):
                for j, (down, up) in enumerate(self.branch_tensors(site.name, t)):
                    state[f"site{i}.layer{j}.down{t}"] = down.cpu().clone()
                    state[f"site{i}.layer{j}.up{t}"] = up.cpu().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a saved state into this freshly attached adapter (on the same, unmodified model).

        Branches are rebuilt and merged in the saved order, so the weights equal the saved model's bit for bit.
        """
        if self.task or self.in_task:
            raise RuntimeError("load_state_dict needs a freshly attached adapter (no task begun yet)")
        if "meta" not in state:
            raise ValueError("not an InfLoRA adapter state: no 'meta' entry")
        try:
            meta = json.loads(bytes(state["meta"].tolist()).decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"corrupt adapter state: unreadable meta ({exc})") from exc
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"adapter state format {meta.get('format')} is not supported (expected {STATE_FORMAT})")
        mine = asdict(self.config)
        differ = sorted(k for k in mine if k in meta["config"] and meta["config"][k] != mine[k])
        if differ:
            details = ", ".join(f"{k}: saved {meta['config'][k]!r} vs attached {mine[k]!r}" for k in differ)
            raise ValueError(f"adapter config differs from the saved state: {details}")
        saved_sites = [(s["name"], s["dim"]) for s in meta["sites"]]
        my_sites = [(s.name, s.dim) for s in self.sites.values()]
        if saved_sites != my_sites:
            raise ValueError(f"saved state has sites {saved_sites[:3]}... ({len(saved_sites)}), this adapter has "
                             f"{my_sites[:3]}... ({len(my_sites)}): attach with the same model and targets")
        n_tasks, in_task = check_state(state, meta, list(self.sites.values()))  # before anything changes
        weights = {name: layer.base.weight.detach().clone() for name, layer in self.layers().items()}
        try:
            for i, site in enumerate(self.sites.values()):
                site.memory.load(state[f"site{i}.memory"], meta["sites"][i]["mode"])
            for t in range(n_tasks + (1 if in_task else 0)):
                for i, site in enumerate(self.sites.values()):
                    for j, (_, layer) in enumerate(site.layers):
                        down = state[f"site{i}.layer{j}.down{t}"]
                        if j == 0:
                            site.downs.append(down.to(self.device, site.stats_layer.base.weight.dtype))
                        branch = layer.add_branch(str(t), down, train_down=self.config.train_down)
                        branch.up.copy_(state[f"site{i}.layer{j}.up{t}"])
                        branch.requires_grad_(t == n_tasks)
                if t < n_tasks:
                    self.task, self.merged = t + 1, [*self.merged, False]
                    if meta["merged"][t]:
                        self.merge_branches()
        except Exception:  # unexpected after the checks: put everything back as it was
            self._reset(weights)
            raise
        self.task, self.in_task = n_tasks, in_task
        self.merged = [bool(m) for m in meta["merged"]]
        self.added = [dict(a) for a in meta.get("added", [])]
        self.short = [dict(a) for a in meta.get("short", [{} for _ in range(n_tasks + int(in_task))])]


    @torch.no_grad()
    def _reset(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Back to freshly attached: no branches, the given base weights, empty memories."""
        for name, layer in self.layers().items():
            layer.branches.clear()
            layer.merged.clear()
            layer.base.weight.copy_(weights[name])
        for site in self.sites.values():
            site.downs.clear()
            site.memory = SubspaceMemory(site.dim, dual=self.config.memory == "dualgpm", energy=self.config.energy,
                                         device=site.memory.basis.device)
        self.task, self.in_task, self.merged = 0, False, []


def attach(
    model: nn.Module,
    preset: str | None = None,
    *,
    targets: str | Sequence[str] | None = None,
    blocks: int | Sequence[int] | None = None,
    config: InfLoRAConfig | None = None,
    freeze: bool = True,
    **options: object,
) -> InfLoRAAdapter:
    """Attach InfLoRA to ``model`` by wrapping the selected ``nn.Linear`` layers in place.

    Choose layers with a ``preset`` (see ``inflora.PRESETS``: ``"timm-vit-kv"``, ``"bert-kv"``) or ``targets``
    (regex or list of regexes over module names); ``blocks`` keeps the first N blocks (int) or given indices.
    Options are :class:`InfLoRAConfig` fields (``rank=10``, ``lamb=0.95``, ``num_tasks=10``, ...), or pass a
    ``config``. ``freeze`` (default) freezes every parameter of ``model``: InfLoRA trains only its branches.
    """
    known = {f.name for f in fields(InfLoRAConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown InfLoRA option(s) {unknown}; valid options: {', '.join(sorted(known))}")
    if config is not None and options:
        raise TypeError("give either config=... or individual options, not both")
    config = config or InfLoRAConfig(**options)  # type: ignore[arg-type]
    config.validate()
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers attached")
    specs = find_sites(model, preset=preset, targets=targets, blocks=blocks)
    for spec in specs:
        for name in spec.layers:
            width = model.get_submodule(name).in_features
            if config.rank > width:
                raise ValueError(f"rank {config.rank} exceeds the input width {width} of layer {name!r}")
    trainable = {p: p.requires_grad for p in model.parameters()}
    wrapped = wrap_linears(model, [(n, s) for spec in specs for n, s in zip(spec.layers, spec.slices, strict=True)])
    try:  # all or nothing: a failure below puts the plain layers and the trainability back
        by_name = dict(wrapped)
        if freeze:
            for p in model.parameters():
                p.requires_grad_(False)
        sites = []
        for spec in specs:
            layers = [(name, by_name[name]) for name in spec.layers]
            dim = layers[0][1].in_features
            memory = SubspaceMemory(dim, dual=config.memory == "dualgpm", energy=config.energy,
                                    device=layers[0][1].base.weight.device)
            sites.append(Site(spec.name, layers, dim, spec.block, memory, []))
        return InfLoRAAdapter(model, sites, config, preset, targets, blocks)
    except BaseException:
        unwrap(model, wrapped)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise

"""Which layers of a model InfLoRA adapts: presets, regular expressions, block selection.

A *site* is a group of ``nn.Linear`` layers that read the same input and therefore share one input statistic,
one memory and one designed down-projection (e.g. a BERT layer's ``key`` and ``value``). A site's *outputs* are
the output slices the branches write to (e.g. the k and v thirds of timm's fused ``qkv``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

SliceFn = Callable[[nn.Linear], list[tuple[int, int]]]


def _kv_slices_of_fused_qkv(layer: nn.Linear) -> list[tuple[int, int]]:
    """k and v thirds of a fused qkv projection whose output is ordered (q, k, v)."""
    if layer.out_features % 3:
        raise ValueError(f"fused qkv layer has {layer.out_features} outputs, not a multiple of 3")
    d = layer.out_features // 3
    return [(d, 2 * d), (2 * d, 3 * d)]


def _qv_slices_of_fused_qkv(layer: nn.Linear) -> list[tuple[int, int]]:
    """q and v thirds of a fused qkv projection whose output is ordered (q, k, v)."""
    if layer.out_features % 3:
        raise ValueError(f"fused qkv layer has {layer.out_features} outputs, not a multiple of 3")
    d = layer.out_features // 3
    return [(0, d), (2 * d, 3 * d)]


@dataclass(frozen=True)
class Preset:
    """A named choice of adapted layers."""

    name: str
    description: str
    pattern: str  # regex searched in module names; named group ``block`` gives the block index
    site_group: str | None = None  # regex group that, stripped from the name, identifies the shared-input site
    slices: SliceFn | None = None  # output slices per layer (None: the whole output)


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add a preset to the registry (name must be new)."""
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


register_preset(
    Preset(
        "timm-vit-kv",
        "timm Vision Transformers: k and v slices of each block's fused attn.qkv",
        r"(?:^|\.)blocks\.(?P<block>\d+)\.attn\.qkv$",
        slices=_kv_slices_of_fused_qkv,
    )
)
register_preset(
    Preset(
        "bert-kv",
        "Hugging Face BERT-family encoders: attention.self.key and .value of each layer (one shared site)",
        r"(?:^|\.)layer\.(?P<block>\d+)\.attention\.self\.(?P<proj>key|value)$",
        site_group="proj",
    )
)

register_preset(
    Preset(
        "timm-vit-qv",
        "timm Vision Transformers: q and v slices of each block's fused attn.qkv (the LoRA baselines' placement)",
        r"(?:^|\.)blocks\.(?P<block>\d+)\.attn\.qkv$",
        slices=_qv_slices_of_fused_qkv,
    )
)
register_preset(
    Preset(
        "bert-qv",
        "Hugging Face BERT-family encoders: attention.self.query and .value of each layer (one shared site)",
        r"(?:^|\.)layer\.(?P<block>\d+)\.attention\.self\.(?P<proj>query|value)$",
        site_group="proj",
    )
)


@dataclass
class SiteSpec:
    """Where one site is: its name, its layers' module names, their output slices and its block index."""

    name: str
    layers: list[str]
    slices: list[list[tuple[int, int]]]
    block: int | None


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def _listing(names: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") if names else "(none)"


def find_sites(
    model: nn.Module,
    preset: str | None = None,
    targets: str | Sequence[str] | None = None,
    blocks: int | Sequence[int] | None = None,
) -> list[SiteSpec]:
    """Resolve a preset or target regex(es) to the sites of ``model``.

    ``targets``: a regex (or list of regexes / exact names) searched in module names; every matching
    ``nn.Linear`` is its own site adapted on its whole output. ``blocks``: an int ``N`` keeps the first N blocks
    (the paper's "b5" is ``blocks=5``), a sequence keeps those block indices; it needs a preset or a regex with a
    named group ``block``.
    """
    if (preset is None) == (targets is None):
        raise ValueError("give exactly one of preset=... or targets=...")
    linears = _linear_names(model)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available presets: {', '.join(sorted(PRESETS))}")
        spec = PRESETS[preset]
        patterns, group, slice_fn = [spec.pattern], spec.site_group, spec.slices
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)  # type: ignore[arg-type]
        group, slice_fn = None, None
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"invalid target pattern {p!r}: {exc}") from exc

    sites: dict[str, SiteSpec] = {}
    for name in linears:
        match = next((m for c in compiled if (m := c.search(name))), None)
        if match is None:
            continue
        block = int(match.group("block")) if "block" in match.re.groupindex else None
        if group is not None and match.group(group) is not None:
            start, stop = match.span(group)
            site_name = (name[:start] + name[stop:]).rstrip(".")
        else:
            site_name = name
        layer = model.get_submodule(name)
        site = sites.setdefault(site_name, SiteSpec(site_name, [], [], block))
        site.layers.append(name)
        site.slices.append(slice_fn(layer) if slice_fn else [(0, layer.out_features)])  # type: ignore[arg-type]
    what = f"preset {preset!r}" if preset else f"targets {patterns!r}"
    if not sites:
        raise ValueError(f"{what} matches no nn.Linear layer of {type(model).__name__}; its linear layers: "
                         f"{_listing(linears)}")

    if blocks is not None:
        found = sorted({s.block for s in sites.values() if s.block is not None})
        if not found:
            raise ValueError(f"blocks={blocks!r} needs block indices: {what} gives none (use a preset or a regex "
                             "with a named group 'block')")
        if isinstance(blocks, int):
            if not 1 <= blocks <= len(found):
                raise ValueError(f"blocks={blocks} but the model has {len(found)} adaptable blocks ({found})")
            keep = set(found[:blocks])
        else:
            keep = {int(b) for b in blocks}
            missing = sorted(keep - set(found))
            if missing:
                raise ValueError(f"blocks {missing} do not exist; adaptable blocks: {found}")
        sites = {k: s for k, s in sites.items() if s.block in keep}

    for site in sites.values():
        dims = {model.get_submodule(n).in_features for n in site.layers}
        if len(dims) != 1:
            raise ValueError(f"site {site.name!r} groups layers with different input widths {sorted(dims)}")
    return list(sites.values())

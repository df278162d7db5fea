"""Checks of a saved adapter state against the attached adapter, before anything is changed (a failed
``InfLoRAAdapter.load_state_dict`` leaves the model and the adapter as they were)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .site import Site


def check_state(state: Mapping[str, torch.Tensor], meta: dict[str, Any], sites: Sequence[Site]) -> tuple[int, bool]:
    """Every tensor a saved state needs is there with the right shape. Returns ``(tasks, in_task)``."""
    try:
        n_tasks, in_task = int(meta["task"]), bool(meta["in_task"])
        modes = [s["mode"] for s in meta["sites"]]
        merged = [bool(m) for m in meta["merged"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"corrupt adapter state: bad meta ({type(exc).__name__}: {exc})") from exc
    if n_tasks < 0 or len(merged) != n_tasks or any(m not in ("basis", "complement") for m in modes):
        raise ValueError(f"corrupt adapter state: meta has task {n_tasks}, merged flags {merged}, modes {modes}")

    def tensor(key: str, ndim: int = 2) -> torch.Tensor:
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"corrupt adapter state: missing tensor {key!r}")
        if value.ndim != ndim:
            raise ValueError(f"corrupt adapter state: {key!r} has shape {tuple(value.shape)}, expected {ndim}-d")
        return value

    for i, site in enumerate(sites):
        memory = tensor(f"site{i}.memory")
        if memory.shape[0] != site.dim or memory.shape[1] > site.dim:
            raise ValueError(f"corrupt adapter state: 'site{i}.memory' has shape {tuple(memory.shape)}, expected "
                             f"({site.dim}, k <= {site.dim})")
        for t in range(n_tasks + int(in_task)):
            for j, (_, layer) in enumerate(site.layers):
                down, up = tensor(f"site{i}.layer{j}.down{t}"), tensor(f"site{i}.layer{j}.up{t}")
                rows = down.shape[0]
                if down.shape[1] != layer.in_features or rows > layer.in_features:
                    raise ValueError(f"corrupt adapter state: 'site{i}.layer{j}.down{t}' has shape "
                                     f"{tuple(down.shape)}, expected (r <= {layer.in_features}, {layer.in_features})")
                if tuple(up.shape) != (layer.adapted_out, rows):
                    raise ValueError(f"corrupt adapter state: 'site{i}.layer{j}.up{t}' has shape {tuple(up.shape)}, "
                                     f"expected ({layer.adapted_out}, {rows})")
    return n_tasks, in_task

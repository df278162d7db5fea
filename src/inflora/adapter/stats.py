"""Input statistics of the adapted layers: uncentred second moments collected with forward hooks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..batches import attention_mask_of, call_model, move_to, split_batch

if TYPE_CHECKING:
    from .adapter import InfLoRAAdapter


class InputStats(dict):
    """``{site name: second moment (d, d)}`` in float64, with ``tokens[site]``: how many token vectors counted."""

    def __init__(self, moments: dict[str, torch.Tensor], tokens: dict[str, int]) -> None:
        super().__init__(moments)
        self.tokens = dict(tokens)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    adapter: InfLoRAAdapter,
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    dtype: torch.dtype = torch.float64,
    autocast: bool = False,
) -> InputStats:
    """Run ``loader`` through ``model`` and return each adapted site's input second moment ``(1/N) sum x x^T``.

    The sum runs over every token vector that reaches the site (all tokens of an image; for text only tokens
    whose ``attention_mask`` is 1, so padding never counts). Products are accumulated on the model's device in
    ``dtype`` (float64 by default); no activation is kept. Batches follow :mod:`inflora.batches`. Under
    ``torch.distributed`` the sums and counts are all-reduced, so every rank gets the statistics of all data.
    The model runs in eval mode without gradients and is returned to its previous mode.
    """
    device = adapter.device
    sums = {s.name: torch.zeros(s.dim, s.dim, dtype=dtype, device=device) for s in adapter.sites.values()}
    counts = {s.name: torch.zeros((), dtype=torch.float64, device=device) for s in adapter.sites.values()}
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(site: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = current_mask[0]
            if mask is not None:
                if tuple(x.shape[:-1]) != tuple(mask.shape):
                    raise ValueError(
                        f"attention_mask of shape {tuple(mask.shape)} does not match the input of site {site!r} "
                        f"of shape {tuple(x.shape)}"
                    )
                x = x[mask.to(torch.bool)]
            x = x.reshape(-1, x.shape[-1]).to(dtype)
            sums[site].addmm_(x.T, x)
            counts[site] += x.shape[0]

        return hook

    handles = [site.stats_layer.register_forward_pre_hook(make_hook(site.name)) for site in adapter.sites.values()]
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            inputs, _ = split_batch(batch)
            inputs = move_to(inputs, device)
            current_mask[0] = attention_mask_of(inputs)
            with torch.autocast(device.type, enabled=autocast and device.type == "cuda"):
                call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    if _distributed():
        for name in sums:
            dist.all_reduce(sums[name])
            dist.all_reduce(counts[name])
    moments, tokens = {}, {}
    for name, total in sums.items():
        n = float(counts[name])
        if n == 0:
            raise ValueError(f"no input reached adapted site {name!r}: is the loader empty, or the model not the "
                             "one the adapter is attached to?")
        moments[name] = (total / n).to(torch.float64)
        tokens[name] = int(n)
    return InputStats(moments, tokens)

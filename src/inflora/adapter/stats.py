"""Input statistics of the adapted layers: uncentred second moments collected with forward hooks."""

from __future__ import annotations

import time
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


class StatsCollector:
    """Forward pre-hooks that accumulate each adapted site's input second moment while the model runs.

    Use as a context manager around forward passes of the model the adapter is attached to; call
    :meth:`set_mask` with each text batch's ``attention_mask`` first (padding never counts). Products are summed on
    the model's device in ``dtype`` (float64 by default); each batch's product ``x^T x`` is formed in ``products``
    (default: ``dtype``; float32 halves the hooks' cost on CPU, its rounding is about 1e-7 of the moment's norm,
    enough to move a direction whose energy sits exactly at a memory threshold); no activation is kept. ``seconds``
    is the wall time spent inside the hooks (the cost the statistics add to a pass that runs anyway; on CUDA, where
    the hooks only queue kernels and no synchronisation is forced for timing, it undercounts). :meth:`result`
    all-reduces under ``torch.distributed`` and returns :class:`InputStats`.
    """

    def __init__(self, adapter: InfLoRAAdapter, dtype: torch.dtype = torch.float64,
                 products: torch.dtype | None = None) -> None:
        device = adapter.device
        self.adapter = adapter
        self.dtype = dtype
        self.products = dtype if products is None else products
        self.sums = {s.name: torch.zeros(s.dim, s.dim, dtype=dtype, device=device) for s in adapter.sites.values()}
        self.counts = {s.name: torch.zeros((), dtype=torch.float64, device=device) for s in adapter.sites.values()}
        self.mask: torch.Tensor | None = None
        self.seconds = 0.0
        self._handles: list[Any] = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def _hook(self, site: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            start = time.perf_counter()
            x = args[0]
            mask = self.mask
            if mask is not None:
                if tuple(x.shape[:-1]) != tuple(mask.shape):
                    raise ValueError(
                        f"attention_mask of shape {tuple(mask.shape)} does not match the input of site {site!r} "
                        f"of shape {tuple(x.shape)}"
                    )
                x = x[mask.to(torch.bool)]
            x = x.reshape(-1, x.shape[-1]).to(self.products)
            if self.products == self.dtype:
                self.sums[site].addmm_(x.T, x)
            else:
                self.sums[site] += (x.T @ x).to(self.dtype)
            self.counts[site] += x.shape[0]
            self.seconds += time.perf_counter() - start

        return hook

    def __enter__(self) -> StatsCollector:
        self._handles = [site.stats_layer.register_forward_pre_hook(self._hook(site.name))
                         for site in self.adapter.sites.values()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> InputStats:
        if _distributed():
            for name in self.sums:
                dist.all_reduce(self.sums[name])
                dist.all_reduce(self.counts[name])
        moments, tokens = {}, {}
        for name, total in self.sums.items():
            n = float(self.counts[name])
            if n == 0:
                raise ValueError(f"no input reached adapted site {name!r}: is the loader empty, or the model not the "
                                 "one the adapter is attached to?")
            moments[name] = (total / n).to(torch.float64)
            tokens[name] = int(n)
        return InputStats(moments, tokens)


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
    The model runs in eval mode without gradients and is returned to its previous mode; ``autocast`` runs its
    forward passes under bfloat16 autocast (on any device; the products are still accumulated in ``dtype``).
    """
    device = adapter.device
    was_training = model.training
    model.eval()
    collector = StatsCollector(adapter, dtype)
    try:
        with collector:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                inputs, _ = split_batch(batch)
                inputs = move_to(inputs, device)
                collector.set_mask(attention_mask_of(inputs))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    call_model(model, inputs)
    finally:
        model.train(was_training)
    return collector.result()

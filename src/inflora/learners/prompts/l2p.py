"""``l2p``: Learning to Prompt (Wang et al., CVPR 2022) as the InfLoRA reference runs it ("L2P++" of CODA-Prompt):
a pool of prompts with learnable keys; each input's query picks its top-k keys by cosine similarity and the chosen
prompts are prefixed (default) or prepended as tokens (the paper's prompt-tuning); a key-query pull loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...config import opt
from ..base import LearnerSetup, TaskContext, register_learner
from .base import PromptLearner, PromptOptions, PullOptions, check_blocks, check_length
from .matching import cosine, prefix_halves, pull_loss, select


@dataclass
class L2POptions(PromptOptions, PullOptions):
    """Options of ``l2p`` (defaults: the reference's ImageNet-R setting, CODA-Prompt's scripts)."""

    pool: int = opt(30, "prompts (and keys) in the pool, per prompted block")
    length: int = opt(20, "rows per prompt: prefix mode L/2 key + L/2 value rows (even); prompt mode L tokens")
    top_k: int = opt(5, "prompts chosen per input (their rows concatenated)")
    blocks: list[int] = opt([0], "prefix mode: 0-based blocks with a pool (each with its own keys and choice); "
                                 "the reference uses [0], or [0, 1, 2, 3, 4]")
    mode: Literal["prefix", "prompt"] = opt("prefix", "prefix: prefix-tuning at `blocks` (the reference, L2P++); "
                                                      "prompt: the chosen prompts as tokens after the embeddings "
                                                      "(the paper's prompt-tuning; excluded from pooling)")

    def validate(self) -> None:
        PromptOptions.validate(self)
        PullOptions.validate(self)
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if not 1 <= self.top_k <= self.pool:
            raise ValueError(f"top_k must lie in [1, pool={self.pool}], got {self.top_k}")
        if self.mode == "prefix":
            check_length("length", self.length)
            check_blocks("blocks", self.blocks)
        elif self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")


@register_learner("l2p")
class L2PLearner(PromptLearner):
    """L2P: per site (a prefixed block, or the input in prompt mode) a pool of ``pool`` prompts ``(length, D)`` and
    keys ``(D_query,)``, all U(0, 1) and all trained every task; the ``top_k`` keys most similar to the query choose
    the prompts (no task identity, at training and test alike); loss = cross-entropy + ``pull_weight`` x pull loss,
    summed over sites."""

    options_type = L2POptions
    options: L2POptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o = self.options
        if o.mode == "prefix":
            self.check_blocks_exist("blocks", o.blocks)
            self.sites: list[int | None] = list(o.blocks)
        else:
            self.sites = [None]
        width = self.width if o.mode == "prefix" else self.seam.dim
        for site in self.sites:
            self.add_parameter(self.key_name(site), (o.pool, self.query_dim))
            self.add_parameter(self.prompt_name(site), (o.pool, o.length, width))

    @staticmethod
    def key_name(site: int | None) -> str:
        return "input_keys" if site is None else f"b{site}_keys"

    @staticmethod
    def prompt_name(site: int | None) -> str:
        return "input_prompts" if site is None else f"b{site}_prompts"

    def trainable(self, ctx: TaskContext) -> list[nn.Parameter]:
        return list(self.store.values())

    def choose(self, query: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per site: ``(B, pool)`` similarities and ``(B, top_k)`` chosen indices."""
        out = []
        for site in self.sites:
            similarity = cosine(query, self.store[self.key_name(site)])
            out.append((similarity, select(similarity, self.options.top_k)))
        return out

    def forward_chosen(self, inputs: Any, chosen: list[Tensor]) -> Tensor:
        """Features with the chosen prompts of every site."""
        prefixes, prompts = {}, None
        for site, idx in zip(self.sites, chosen, strict=True):
            rows = self.store[self.prompt_name(site)][idx]  # (B, top_k, length, D)
            if site is None:
                prompts = rows.reshape(rows.shape[0], -1, rows.shape[-1])
            else:
                prefixes[site] = prefix_halves(rows)
        return self.prompted(inputs, prefixes=prefixes or None, prompts=prompts)

    def prompt_features(self, inputs: Any, query: Tensor, upto: int) -> Tensor:
        return self.forward_chosen(inputs, [idx for _, idx in self.choose(query)])

    def train_features(self, inputs: Any, query: Tensor, ctx: TaskContext
                       ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        choices = self.choose(query)
        features = self.forward_chosen(inputs, [idx for _, idx in choices])
        pull = torch.stack([pull_loss(sim, idx, self.options.pull) for sim, idx in choices]).sum()
        for site, (_, idx) in zip(self.sites, choices, strict=True):
            self.count(f"prompt_use_{'input' if site is None else f'block{site}'}", idx, self.options.pool)
        return features, self.options.pull_weight * pull, {"pull": pull}

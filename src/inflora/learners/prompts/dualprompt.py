"""``dualprompt``: DualPrompt (Wang et al., ECCV 2022) as the InfLoRA reference runs it: a shared G-prompt prefixed
at the first blocks, task-specific E-prompts prefixed at the next blocks; training uses the task's own E-prompt
and pulls its key toward the queries; the test picks the E-prompt whose key best matches the query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...config import opt
from ...seam import Prefixes
from ..base import LearnerSetup, TaskContext, register_learner
from .base import PromptLearner, PromptOptions, PullOptions, check_blocks, check_length
from .matching import cosine, prefix_halves, pull_loss, select


@dataclass
class DualPromptOptions(PromptOptions, PullOptions):
    """Options of ``dualprompt`` (defaults: the reference's ImageNet-R setting, CODA-Prompt's scripts)."""

    g_length: int = opt(6, "G-prompt rows per block: L/2 key + L/2 value rows (even; 0: no G-prompt)")
    g_blocks: list[int] = opt([0, 1], "0-based blocks with the shared G-prompt")
    e_length: int = opt(20, "E-prompt rows per block: L/2 key + L/2 value rows (even)")
    e_blocks: list[int] = opt([2, 3, 4], "0-based blocks with E-prompts (each block its own keys and choice)")
    e_pool: int | None = opt(None, "E-prompts per block (null: the number of tasks; task t trains E-prompt t)")
    e_select: Literal["all", "seen"] = opt("all", "test-time matching over all E-keys, untrained ones included "
                                                  "(all: the reference) or those of tasks learnt so far (seen)")

    def validate(self) -> None:
        PromptOptions.validate(self)
        PullOptions.validate(self)
        check_length("g_length", self.g_length, allow_zero=True)
        check_length("e_length", self.e_length)
        check_blocks("g_blocks", self.g_blocks, allow_empty=True)
        check_blocks("e_blocks", self.e_blocks)
        if self.e_pool is not None and self.e_pool < 1:
            raise ValueError(f"e_pool must be >= 1 or null, got {self.e_pool}")


@register_learner("dualprompt")
class DualPromptLearner(PromptLearner):
    """DualPrompt: G-prompts ``(g_length, D)`` per G-block (retrained every task); per E-block ``e_pool`` E-prompts
    ``(e_length, D)`` with keys ``(D_query,)``, all U(0, 1). Task ``t`` trains E-prompt and key ``t`` (only those:
    the reference's optimiser holds the whole pool, but the others get no gradient) and the G-prompts; at a block
    with both, E rows come before G rows."""

    options_type = DualPromptOptions
    options: DualPromptOptions

    def __init__(self, setup: LearnerSetup) -> None:
        super().__init__(setup)
        o = self.options
        self.check_blocks_exist("g_blocks", o.g_blocks)
        self.check_blocks_exist("e_blocks", o.e_blocks)
        self.pool = o.e_pool or self.num_tasks
        if self.pool < self.num_tasks:
            raise ValueError(f"dualprompt.e_pool={self.pool} < {self.num_tasks} tasks: task t trains E-prompt t")
        self.g_blocks = list(o.g_blocks) if o.g_length else []
        for block in self.g_blocks:
            self.add_parameter(f"g{block}", (o.g_length, self.width))
        for block in o.e_blocks:
            for i in range(self.pool):
                self.add_parameter(f"e{block}_key{i}", (self.query_dim,))
                self.add_parameter(f"e{block}_prompt{i}", (o.e_length, self.width))

    def e_keys(self, block: int, count: int) -> Tensor:
        """``(count, D_query)``: the first ``count`` E-keys of ``block``."""
        return torch.stack([self.store[f"e{block}_key{i}"] for i in range(count)])

    def e_prompts(self, block: int) -> Tensor:
        """``(pool, e_length, D)``: the E-prompts of ``block``."""
        return torch.stack([self.store[f"e{block}_prompt{i}"] for i in range(self.pool)])

    def trainable(self, ctx: TaskContext) -> list[nn.Parameter]:
        t = ctx.index
        own = [self.store[f"e{b}_{kind}{t}"] for b in self.options.e_blocks for kind in ("key", "prompt")]
        return [*(self.store[f"g{b}"] for b in self.g_blocks), *own]

    def count_diagnostics(self) -> dict[str, Any]:
        """``e_key_match``: per E-block, the share of the task's training samples whose test-time choice would be
        the task's own E-prompt (the queries against the keys as they were at each step)."""
        return {"e_key_match": {k: float(v[1]) / max(int(v.sum()), 1) for k, v in self.counts.items()}}

    def candidates(self, upto: int) -> int:
        """Number of E-keys matched at test time after task ``upto``."""
        return self.pool if self.options.e_select == "all" else upto + 1

    def with_g(self, prefixes: dict[int, tuple[Tensor, Tensor]], batch: int) -> Prefixes:
        """Add the G-prompts' halves behind any E rows of the same block."""
        out = dict(prefixes)
        for block in self.g_blocks:
            gk, gv = prefix_halves(self.store[f"g{block}"])
            if block in out:
                ek, ev = out[block]
                gk, gv = (g.unsqueeze(0).expand(batch, -1, -1) for g in (gk, gv))
                out[block] = (torch.cat([ek, gk], dim=1), torch.cat([ev, gv], dim=1))
            else:
                out[block] = (gk, gv)
        return out

    def prompt_features(self, inputs: Any, query: Tensor, upto: int) -> Tensor:
        prefixes = {}
        for block in self.options.e_blocks:
            idx = select(cosine(query, self.e_keys(block, self.candidates(upto))), 1)  # (B, 1)
            prefixes[block] = prefix_halves(self.e_prompts(block)[idx])
        return self.prompted(inputs, prefixes=self.with_g(prefixes, len(query)))

    def train_features(self, inputs: Any, query: Tensor, ctx: TaskContext
                       ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        t, batch = ctx.index, len(query)
        own = torch.full((batch, 1), t, dtype=torch.long, device=query.device)
        prefixes, pulls = {}, []
        for block in self.options.e_blocks:
            similarity = cosine(query, self.e_keys(block, self.pool))
            pulls.append(pull_loss(similarity, own, self.options.pull))
            matched = select(similarity[:, : self.candidates(t)], 1)
            self.count(f"block{block}", (matched == t).long(), 2)  # [mismatched, matched]
            pk, pv = prefix_halves(self.store[f"e{block}_prompt{t}"])
            prefixes[block] = (pk.unsqueeze(0).expand(batch, -1, -1), pv.unsqueeze(0).expand(batch, -1, -1))
        pull = torch.stack(pulls).sum()
        features = self.prompted(inputs, prefixes=self.with_g(prefixes, batch))
        return features, self.options.pull_weight * pull, {"pull": pull}

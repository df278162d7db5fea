"""Training throughput and peak memory: InfLoRA as inflora runs it against a reference-style implementation.

Both sides train the same timm ViT (random weights, built from the same seed), on the same batch, for the same
number of steps, in one process, at task 1 and at task 10 (``--tasks``):

* **inflora** (ours): the real path. An :class:`~inflora.learners.InfLoRALearner` (``linear`` heads) goes through
  the earlier tasks' ``begin_task``/``end_task`` (statistics passes, design, memory update, merge, with no training
  in between), then trains the current task with the training loop's pieces (``TaskStep``, ``make_optimizer``):
  every finished branch is merged into the frozen weight, so a forward pass computes one low-rank branch; timm's
  attention uses SDPA (``fused_attn``, timm's default) and, on CUDA, the steps run under bfloat16 autocast.
* **reference**: written here the way the reference implementation computes: each adapted ``qkv`` layer keeps every
  task's branch (down-projection ``A_t``, up-projections ``B_t`` for keys and values; only the current ``B`` trains)
  and every forward pass sums ``B_t A_t`` over all tasks so far and adds ``x (sum_t B_t A_t)^T`` to the keys and
  values; attention is unfused (timm's ``fused_attn`` switched off on the same model), everything in float32. One
  linear head for the current task's classes.

Throughput is training samples per second over ``--steps`` timed optimiser steps after ``--warmup`` untimed ones.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps (every live tensor, the weights
included); on the CPU the peak resident set size during the timed steps above the resident size just before them
(Linux: the high-water mark is reset through ``/proc/self/clear_refs`` after ``malloc_trim``; elsewhere the
lifetime ``ru_maxrss`` delta, which reads 0 when an earlier phase peaked higher). Examples::

    python benchmarks/throughput.py --device cuda --json throughput-gpu.json                 # ViT-B/16, batch 64
    python benchmarks/throughput.py --device cpu --batch 4 --steps 2 --warmup 1 --threads 2      # ViT-S/16
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from inflora.backbones import build_backbone
from inflora.classifiers import CLASSIFIERS, ClassLayout
from inflora.config import TrainConfig
from inflora.learners import InfLoRALearner, LearnerSetup, TaskContext
from inflora.learners.lora import InfLoRAOptions
from inflora.runtime import Runtime
from inflora.training import TaskStep, make_optimizer

SEED = 0


# ------------------------------------------------------------------------------------------ the reference style
class SummedBranchesQKV(nn.Module):
    """timm's fused ``qkv`` linear with InfLoRA branches kept the reference's way: per task ``t`` a frozen
    down-projection ``A_t`` (r, d) and up-projections ``B_t^k``, ``B_t^v`` (d, r); every forward sums the products
    ``B_t A_t`` over all tasks so far and adds ``x`` times the sums to the key and value thirds."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base, self.rank, self.dim = base, rank, base.in_features
        self.downs = nn.ParameterList()
        self.ups_k = nn.ParameterList()
        self.ups_v = nn.ParameterList()

    def add_task(self, generator: torch.Generator) -> None:
        """A new branch: orthonormal rows / sqrt(3) (as designed), zero up-projections; only the new ``B`` trains."""
        for up in (*self.ups_k, *self.ups_v):
            up.requires_grad_(False)
        weight = self.base.weight
        rows = torch.linalg.qr(torch.randn(self.dim, self.rank, generator=generator))[0].T / math.sqrt(3.0)
        self.downs.append(nn.Parameter(rows.to(weight), requires_grad=False))
        for ups in (self.ups_k, self.ups_v):
            ups.append(nn.Parameter(torch.zeros(self.dim, self.rank, device=weight.device, dtype=weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta_k = torch.stack([b @ a for a, b in zip(self.downs, self.ups_k, strict=True)]).sum(0)
        delta_v = torch.stack([b @ a for a, b in zip(self.downs, self.ups_v, strict=True)]).sum(0)
        c = self.dim
        keys = out[..., c : 2 * c] + F.linear(x, delta_k)
        values = out[..., 2 * c :] + F.linear(x, delta_v)
        return torch.cat([out[..., :c], keys, values], dim=-1)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm attention modules: a fused ``qkv`` layer and the ``fused_attn`` switch."""
    found = [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "qkv")]
    if not found:
        raise SystemExit("the model has no timm Attention module with a fused qkv and fused_attn: use a timm ViT")
    return found


def reference_side(args: argparse.Namespace, task: int, x: torch.Tensor, y: torch.Tensor, device: torch.device
                   ) -> tuple[Callable[[], None], dict[str, Any]]:
    """The reference-style model at task ``task`` (1-based) and one training step of it."""
    torch.manual_seed(SEED)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size).to(device)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(SEED)
    wrappers = []
    for attn in attention_modules(model):
        attn.fused_attn = False
        wrapper = SummedBranchesQKV(attn.qkv, args.rank)
        attn.qkv = wrapper
        wrappers.append(wrapper)
    for _ in range(task):
        for wrapper in wrappers:
            wrapper.add_task(generator)
    head = nn.Linear(model.num_features, args.classes, device=device)
    params = [p for w in wrappers for p in (w.ups_k[-1], w.ups_v[-1])] + list(head.parameters())
    optimiser = torch.optim.Adam(params, lr=1e-3)
    local = y - (task - 1) * args.classes
    model.train()

    def step() -> None:
        loss = F.cross_entropy(head(model(x)), local)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step, {"fused_attn": 0, "dtype": "float32", "branches_per_layer": task}


# ------------------------------------------------------------------------------------------ ours
def inflora_side(args: argparse.Namespace, task: int, x: torch.Tensor, y: torch.Tensor, device: torch.device
                 ) -> tuple[Callable[[], None], dict[str, Any]]:
    """The real InfLoRA learner brought to task ``task`` (1-based) and one training step of it."""
    runtime = Runtime.create(str(device), amp=True)
    torch.manual_seed(SEED)
    backbone = build_backbone(f"timm:{args.model}", pretrained=False, img_size=args.img_size)
    num_tasks = max(args.tasks)
    layout = ClassLayout.create("class", [args.classes] * num_tasks)
    classifier = CLASSIFIERS.get("linear")(backbone.feature_dim, layout, None, runtime.device)
    train = TrainConfig()
    setup = LearnerSetup(backbone, classifier, InfLoRAOptions(rank=args.rank), train, runtime, num_tasks, SEED)
    learner = InfLoRALearner(setup)
    stats_x = x[: args.stats_batch]

    def context(t: int) -> TaskContext:
        labels = torch.arange(len(stats_x), device=device) % args.classes + t * args.classes

        def one_batch(*_args: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            yield stats_x, labels

        return TaskContext(index=t, num_tasks=num_tasks, classes=list(range(t * args.classes, (t + 1) * args.classes)),
                           seed=SEED, runtime=runtime, train_pass=one_batch, feature_pass=one_batch)

    for t in range(task - 1):  # earlier tasks: statistics, design, memory, merge (no training)
        learner.begin_task(context(t))
        learner.end_task(context(t))
    ctx = context(task - 1)
    learner.begin_task(ctx)
    groups = learner.parameter_groups(ctx)
    for p in (p for g in groups for p in g["params"]):
        p.requires_grad_(True)
    optimiser = make_optimizer(train, groups)
    task_step = TaskStep(learner, ctx)
    learner.train_mode(True)

    def step() -> None:
        with runtime.autocast():
            loss = task_step(x, y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    layers = learner.adapter.layers().values()
    return step, {"fused_attn": sum(bool(m.fused_attn) for m in attention_modules(backbone)),
                  "dtype": "bfloat16 autocast" if runtime.amp else "float32",
                  "branches_per_layer": max(len(layer.branches) for layer in layers),
                  "merged_per_layer": max(len(layer.merged) for layer in layers)}


# ------------------------------------------------------------------------------------------ measuring
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of the block (MiB) in ``mib``, and how it was measured in ``method``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib, self.method = device, 0.0, ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # give freed heap back, so the baseline is what is live
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
            self.method = "peak RSS delta (VmHWM after a reset, minus VmRSS before)"
        except OSError:
            self.method = "ru_maxrss delta (lifetime peak; 0 when an earlier phase peaked higher)"
        self._start = _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.method = "torch.cuda.max_memory_allocated (all live tensors, weights included)"
        elif self.method.startswith("peak RSS"):
            self.mib = max(0, (_status_kib("VmHWM") or 0) - self._start) / 1024
        else:
            self.mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._lifetime) / 1024


def measure(side: Callable[..., tuple[Callable[[], None], dict[str, Any]]], args: argparse.Namespace, task: int,
            x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Build one side at ``task``, run the warm-up steps, then time ``args.steps`` steps under :class:`PeakMemory`."""
    step, info = side(args, task, x, y, device)
    for _ in range(args.warmup):
        step()
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**info, "task": task, "seconds": seconds, "samples_per_s": args.batch * args.steps / seconds,
            "peak_memory_mib": memory.mib, "memory_method": memory.method}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--model", default=None, help="timm ViT name (default: vit_base_patch16_224 on a GPU, "
                                                      "vit_small_patch16_224 on the CPU)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: 64 on a GPU, 8 on the CPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per side and task")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--tasks", default="1,10", help="comma-separated tasks (1-based) to measure at")
    parser.add_argument("--rank", type=int, default=10, help="rank of each task's branch")
    parser.add_argument("--classes", type=int, default=10, help="classes per task")
    parser.add_argument("--stats-batch", type=int, default=2, help="images in ours' statistics passes of the earlier "
                        "tasks (setup only: their content does not change the timed steps)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args(argv)
    device = Runtime.create(args.device).device
    gpu = device.type == "cuda"
    args.model = args.model or ("vit_base_patch16_224" if gpu else "vit_small_patch16_224")
    args.batch = args.batch or (64 if gpu else 8)
    args.tasks = sorted({int(t) for t in args.tasks.split(",") if t.strip()})
    if not args.tasks or min(args.tasks) < 1 or args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit("--tasks must be positive integers, --steps and --batch >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    card = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    generator = torch.Generator().manual_seed(SEED)
    args.img_size = args.img_size or timm.models.get_pretrained_cfg(args.model).input_size[-1]
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    rows: list[dict[str, Any]] = []
    print(f"{args.model} ({args.img_size} px), batch {args.batch}, {args.steps} timed steps after {args.warmup}, "
          f"rank {args.rank}, on {card}", flush=True)
    for task in args.tasks:
        y = (torch.randint(0, args.classes, (args.batch,), generator=generator) + (task - 1) * args.classes).to(device)
        for name, side in (("inflora", inflora_side), ("reference", reference_side)):
            row = {"side": name, **measure(side, args, task, x, y, device)}
            rows.append(row)
            print(f"task {task:>2} {name:>9}: {row['samples_per_s']:8.1f} samples/s, peak memory "
                  f"{row['peak_memory_mib']:8.1f} MiB ({row['dtype']}, {row['fused_attn']} SDPA attention modules, "
                  f"{row['branches_per_layer']} unmerged branch(es) per layer)", flush=True)
    ratios = {}
    for task in args.tasks:
        ours, ref = (next(r for r in rows if r["task"] == task and r["side"] == s) for s in ("inflora", "reference"))
        ratios[task] = {"speed": ours["samples_per_s"] / ref["samples_per_s"],
                        "memory": ref["peak_memory_mib"] / ours["peak_memory_mib"] if ours["peak_memory_mib"] else None}
        memory = f"{ratios[task]['memory']:.2f}x" if ratios[task]["memory"] else "n/a"
        print(f"task {task:>2}: inflora / reference speed {ratios[task]['speed']:.2f}x, reference / inflora peak "
              f"memory {memory}")
    print(f"peak memory: {rows[0]['memory_method']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": card, "model": args.model, "img_size": args.img_size,
                                               "batch": args.batch, "stats_batch": args.stats_batch,
                                               "steps": args.steps, "warmup": args.warmup, "rank": args.rank,
                                               "torch": torch.__version__, "timm": timm.__version__,
                                               "rows": rows, "ratios": ratios}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

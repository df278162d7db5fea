"""Cost of the prompt baselines against InfLoRA, measured in one run: training samples per second and per-sample
inference time of ``l2p``, ``dualprompt`` and ``codaprompt`` relative to ``inflora`` on the same backbone.

Prompt methods run two forward passes per sample (a prompt-free query pass, then the prompted pass), at training and
at test; InfLoRA runs one (its branches merge after each task), plus its statistics passes at the task's start and
end (reported separately as the task's begin + end seconds). Every learner gets its own copy of the backbone (same
weights); the timed chunks run round-robin over the methods after a warm-up, on fixed batches, and the median chunk
is reported. Examples::

    python benchmarks/prompt_cost.py                                    # a tiny random ViT, CPU
    python benchmarks/prompt_cost.py --backbone all-MiniLM-L6-v2 --data-dir ../shared/data
    python benchmarks/prompt_cost.py --backbone all-MiniLM-L6-v2 --option l2p.pool=10 --device cuda

Method options come from each method's defaults (the reference's ImageNet-R settings) plus ``--option
method.key=value``; the tiny ViT uses ``codaprompt.pool=40`` (40 orthogonal keys fit its width 48).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from inflora.backbones import Backbone, build_backbone
from inflora.classifiers import ClassLayout, LinearHeads
from inflora.config import load_config
from inflora.learners import LEARNERS, Learner, LearnerSetup, TaskContext
from inflora.runtime import Runtime

METHODS = ["inflora", "l2p", "dualprompt", "codaprompt"]
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 48, "num_heads": 3}
WORDS = ["please", "book", "a", "table", "for", "two", "at", "the", "italian", "place", "tonight", "what", "is", "my",
         "account", "balance", "and", "how", "do", "i", "transfer", "money", "to", "savings", "set", "an", "alarm",
         "seven", "tomorrow", "morning"]


def make_backbone(name: str) -> Backbone:
    if name == "tiny-vit":
        return build_backbone("timm:vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    return build_backbone(name, pretrained=not name.startswith("timm:"))


def make_batch(backbone: Backbone, size: int, data_dir: str | None, seed: int) -> tuple[Any, torch.Tensor]:
    """A fixed batch: random images, or utterances (CLINC150's training set when ``data_dir`` has it)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(size) % 2
    if backbone.modality == "image":
        img = backbone.img_size or 224
        return torch.randn(size, 3, img, img, generator=gen), labels
    path = Path(data_dir or "") / "clinc150" / "data_full.json"
    if data_dir and path.is_file():
        pool = [text for text, _ in json.loads(path.read_text())["train"]]
        texts = [pool[int(i)] for i in torch.randint(len(pool), (size,), generator=gen)]
    else:
        texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (8 + k % 8,), generator=gen))
                 for k in range(size)]
    inputs, _ = backbone.collate([(t, 0) for t in texts])
    return inputs, labels


def build(method: str, backbone: Backbone, options: list[str], runtime: Runtime, tasks: int) -> Learner:
    mine = [o for o in options if o.split(".", 1)[0] == method]
    config = load_config(None, [f"method={method}", "classifier=linear", *mine])
    classifier = LinearHeads(backbone.feature_dim, ClassLayout.create("class", [2] * tasks), None, runtime.device)
    setup = LearnerSetup(backbone, classifier, config.method_options, config.train, runtime, tasks, 0)
    return LEARNERS.get(method)(setup)


def to_device(inputs: Any, device: torch.device) -> Any:
    return {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-vit", help="tiny-vit, all-MiniLM-L6-v2, timm:<name>, hf:<id>")
    parser.add_argument("--data-dir", default=None, help="text: take utterances from CLINC150 here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=5, help="timed chunks per method")
    parser.add_argument("--tasks", type=int, default=10, help="tasks of the scenario the learners are built for")
    parser.add_argument("--option", action="append", default=[], help="method.key=value for one method")
    args = parser.parse_args(argv)

    runtime = Runtime.create(args.device, amp=True)
    options = (["codaprompt.pool=40"] if args.backbone == "tiny-vit" else []) + args.option
    base = make_backbone(args.backbone)
    x, y = make_batch(base, args.batch_size, args.data_dir, seed=0)
    x, y = to_device(x, runtime.device), y.to(runtime.device)
    learners: dict[str, Learner] = {}
    optimisers: dict[str, torch.optim.Optimizer] = {}
    overhead: dict[str, float] = {}
    ctx = TaskContext(0, args.tasks, [0, 1], 0, runtime, train_pass=lambda limit=None, phase="": iter([(x, y)]),
                      feature_pass=lambda: iter([(x, y)]), same_inputs=base.modality == "text")
    for method in METHODS:
        learner = build(method, copy.deepcopy(base), options, runtime, args.tasks)
        runtime.sync()
        start = time.perf_counter()
        learner.begin_task(ctx)
        runtime.sync()
        overhead[method] = time.perf_counter() - start
        groups = learner.parameter_groups(ctx)
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        learners[method], optimisers[method] = learner, torch.optim.Adam(groups)

    def train_chunk(method: str) -> float:
        learner, optimiser = learners[method], optimisers[method]
        learner.train_mode(True)
        runtime.sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            with runtime.autocast():
                loss = learner.training_step(x, y, ctx).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        runtime.sync()
        return args.steps * args.batch_size / (time.perf_counter() - start)

    @torch.no_grad()
    def infer_chunk(method: str) -> float:
        learner = learners[method]
        learner.train_mode(False)
        runtime.sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            learner.predict(x, 0)
        runtime.sync()
        return (time.perf_counter() - start) / (args.steps * args.batch_size)

    throughput: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.repeats + 1):  # round 0: warm-up
        for method in METHODS:
            value = train_chunk(method)
            if r:
                throughput[method].append(value)
    for method in METHODS:
        learner = learners[method]
        for g in optimisers[method].param_groups:
            for p in g["params"]:
                p.requires_grad_(False)
        runtime.sync()
        start = time.perf_counter()
        learner.end_task(ctx)
        runtime.sync()
        overhead[method] += time.perf_counter() - start
    latency: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.repeats + 1):
        for method in METHODS:
            value = infer_chunk(method)
            if r:
                latency[method].append(value)

    train_rate = {m: statistics.median(v) for m, v in throughput.items()}
    infer_time = {m: statistics.median(v) for m, v in latency.items()}
    print(f"backbone {args.backbone} on {runtime.device}, batch {args.batch_size}, {args.steps} steps x "
          f"{args.repeats} chunks per method (median)")
    print(f"{'method':<12}{'train samples/s':>16}{'x inflora':>11}{'infer ms/sample':>17}{'x inflora':>11}"
          f"{'begin+end s':>13}")
    for m in METHODS:
        print(f"{m:<12}{train_rate[m]:>16.1f}{train_rate[m] / train_rate['inflora']:>11.2f}"
              f"{1000 * infer_time[m]:>17.3f}{infer_time[m] / infer_time['inflora']:>11.2f}{overhead[m]:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

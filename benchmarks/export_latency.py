"""Inference latency of an exported (merged) model against the plain backbone and the unmerged adapter.

For each backbone, in one process and with the same classifier (``tasks`` heads of ``classes`` classes):

* (a) **exported**: InfLoRA with ``tasks`` rank-``rank`` branches, merged and exported by
  :func:`inflora.export.export_model`, reloaded with plain timm / transformers (:class:`ExportedModel`);
* (b) **plain**: the untouched backbone (no adapter at all) and the stacked classifier;
* (c) **unmerged**: the same adapter with every task's branch kept (``merge=False``) and active, then the task heads.

Branches have random, fixed (seeded) down- and up-projections. Each timed call is a forward pass under
``torch.inference_mode`` on a fixed batch; the three variants are timed round-robin after a warm-up and the median
of ``--repeats`` calls is reported. Example::

    python benchmarks/export_latency.py --repeats 15 --batch-sizes 1,32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from inflora import attach
from inflora.backbones import Backbone, build_backbone
from inflora.export import ExportedModel, export_model


class PlainModel(nn.Module):
    """(b): the untouched backbone, then one linear classifier."""

    def __init__(self, backbone: Backbone, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        self.classifier.load_state_dict({"weight": weight, "bias": bias})

    def forward(self, inputs: Any) -> torch.Tensor:
        feats = self.backbone(**inputs) if isinstance(inputs, dict) else self.backbone(inputs)
        return self.classifier(feats)


class UnmergedModel(nn.Module):
    """(c): the backbone with all task branches active, then the concatenated task heads (as the learner does)."""

    def __init__(self, backbone: Backbone, heads: nn.ModuleList) -> None:
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def forward(self, inputs: Any) -> torch.Tensor:
        feats = self.backbone(**inputs) if isinstance(inputs, dict) else self.backbone(inputs)
        return torch.cat([head(feats) for head in self.heads], dim=-1)


def build_variants(name: str, args: argparse.Namespace, kwargs: dict[str, Any], tmp: str
                   ) -> tuple[dict[str, nn.Module], Callable[[int], Any], dict[str, Any]]:
    """The three models of backbone ``name`` on ``args.device`` and a maker of input batches."""
    torch.manual_seed(0)
    plain = build_backbone(name, pretrained=not name.startswith("timm:"), **kwargs).eval()
    adapted = build_backbone(name, pretrained=not name.startswith("timm:"), **kwargs).eval()
    adapted.load_state_dict(plain.state_dict())
    adapter = attach(adapted, adapted.adapter_preset, rank=args.rank, num_tasks=args.tasks, merge=False,
                     design="random", update_memory=False)
    adapter.generator = torch.Generator().manual_seed(1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(args.tasks):
        adapter.begin_task()
        with torch.no_grad():
            for layer in adapter.layers().values():
                up = layer.branch(adapter.current_task).up
                up.copy_(torch.randn(up.shape, generator=gen) * args.up_std)
        adapter.end_task()
    heads = nn.ModuleList(nn.Linear(adapted.feature_dim, args.classes) for _ in range(args.tasks))
    weight = torch.cat([h.weight for h in heads]).detach()
    bias = torch.cat([h.bias for h in heads]).detach()
    names = [f"class_{i}" for i in range(weight.shape[0])]
    export_model(adapted, weight, bias, names, tmp, recipe="imagenet", model_kwargs=kwargs,
                 reference=lambda x: torch.nn.functional.linear(adapted(**x) if isinstance(x, dict) else adapted(x),
                                                                weight, bias))
    device = torch.device(args.device)
    models: dict[str, nn.Module] = {
        "exported": ExportedModel.load(tmp, device=device),
        "plain": PlainModel(plain, weight, bias).to(device).eval(),
        "unmerged": UnmergedModel(adapted, heads).to(device).eval(),
    }
    info = {"feature_dim": adapted.feature_dim, "adapted_layers": len(adapter.layers()),
            "branches_per_layer": args.tasks, "classes": weight.shape[0]}

    def batch(size: int) -> Any:
        g = torch.Generator().manual_seed(size)
        if adapted.modality == "image":
            s = adapted.img_size or 224
            return torch.rand(size, 3, s, s, generator=g).to(device)
        tok = adapted.tokenizer
        ids = torch.randint(1000, tok.vocab_size, (size, args.seq_len), generator=g)
        ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "token_type_ids": torch.zeros_like(ids).to(device)}

    return models, batch, info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def time_variants(models: dict[str, nn.Module], inputs: Any, args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds per forward of each model, timed round-robin."""
    for _ in range(args.warmup):
        for model in models.values():
            model(inputs)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for key, model in models.items():
            sync(args.device)
            start = time.perf_counter()
            model(inputs)
            sync(args.device)
            times[key].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def max_difference(models: dict[str, nn.Module], inputs: Any) -> float:
    ref = models["unmerged"](inputs).float()
    return float((models["exported"](inputs).float() - ref).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per variant and batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--tasks", type=int, default=10, help="tasks = branches per adapted layer")
    parser.add_argument("--rank", type=int, default=10, help="rank of each branch")
    parser.add_argument("--classes", type=int, default=10, help="classes per task")
    parser.add_argument("--up-std", type=float, default=0.02, help="std of the random up-projections")
    parser.add_argument("--seq-len", type=int, default=32, help="text: tokens per input")
    parser.add_argument("--vit", default="vit_small_patch16_224", help="timm ViT name ('' skips it)")
    parser.add_argument("--img-size", type=int, default=224, help="ViT input size")
    parser.add_argument("--text", default="all-MiniLM-L6-v2", help="text backbone ('' skips it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    backbones: list[tuple[str, dict[str, Any]]] = []
    if args.text:
        backbones.append((args.text, {"max_length": args.seq_len}))
    if args.vit:
        backbones.append((f"timm:{args.vit}", {"img_size": args.img_size}))

    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tasks} tasks x "
          f"rank {args.rank} branches, {args.classes} classes per task; median of {args.repeats} "
          f"(warm-up {args.warmup}); text {args.seq_len} tokens")
    rows = []
    for name, kwargs in backbones:
        with tempfile.TemporaryDirectory() as tmp:
            models, batch, info = build_variants(name, args, kwargs, tmp)
            diff = max_difference(models, batch(2))
            print(f"{name}: {info['adapted_layers']} adapted layers, feature {info['feature_dim']}, "
                  f"{info['classes']} classes; max |exported - unmerged| logit difference {diff:.2e}")
            for size in sizes:
                ms = time_variants(models, batch(size), args)
                rows.append((name, size, ms))
            del models
    header = (f"{'backbone':<28} {'batch':>5} {'(a) exported':>13} {'(b) plain':>10} {'(c) unmerged':>13} "
              f"{'a/b':>6} {'c/b':>6} {'c/a':>6}")
    print()
    print(header)
    print("-" * len(header))
    for name, size, ms in rows:
        a, b, c = ms["exported"], ms["plain"], ms["unmerged"]
        print(f"{name:<28} {size:>5} {a:>10.2f} ms {b:>7.2f} ms {c:>10.2f} ms {a / b:>6.3f} {c / b:>6.3f} "
              f"{c / a:>6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which head can hold several domains? Heads on the frozen encoder's features of a domain-incremental text benchmark
(default ``clinc150-ciphers``: plain text, then 4 ciphers, 150 shared intents), refitted after each domain from what
the run may keep (class statistics or Gram matrices, never inputs), evaluated on every domain seen so far.

Heads (each starts from zero weights after every domain, so the head alone is measured; the features never move):

- ``pooled``: the ``aligned`` classifier's alignment as inflora runs it (``inflora.alignment.align_linear``): one
  Gaussian per class, its moments pooled over every domain seen.
- ``mixture``: one Gaussian per (class, domain), each class's ``samples_per_class`` split over its domains in
  proportion to their counts, mean scaling by the domain's task (as a class's task in class-incremental runs); the
  same SGD otherwise. With one domain it is ``pooled`` exactly (tested).
- ``ridge``: the exact least-squares linear head ``(X^T X + lam I)^-1 X^T Y`` on the raw features of every domain
  seen: what any linear head on these features can reach, without sampling.
- ``prototype``: cosine nearest class mean, each class's mean pooled over every domain seen (the ``prototype``
  classifier of SimpleCIL and APER as inflora runs them).
- ``prototype-domain``: cosine nearest mean of one prototype per (class, domain); the class of the nearest wins.

The alignment's budget (``--epochs``, ``--lr``, ``--weight-decay``) defaults to the preset's (10, 0.01, 5e-4); a
larger one shows how much of the gap is under-training. Example::

    python benchmarks/domain_heads.py --data-dir ../shared/data --cache /tmp/ciphers-features.pt
    python benchmarks/domain_heads.py --data-dir ../shared/data --cache /tmp/ciphers-features.pt --epochs 20 \
        --lr 0.1 --weight-decay 0

Prints one line per (head, domain) with the accuracy on every domain seen, then A_T and forgetting per head.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from inflora.alignment import ClassStatistics, align_linear, alignment_lr, class_gaussians, draw_samples
from inflora.metrics import final_accuracy, forgetting

HEADS = ("pooled", "mixture", "ridge", "prototype", "prototype-domain")


@dataclass
class Budget:
    """The alignment options ``align_linear`` reads (the ``aligned`` classifier's names)."""

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    samples_per_class: int = 256
    batch_size: int = 128
    shrink: float = 1e-4
    logit_norm: float | None = None
    mean_scale: bool = True


@dataclass
class Features:
    """Features ``x`` ``(n, dim)``, labels ``y`` and domain ids ``d`` of one split."""

    x: torch.Tensor
    y: torch.Tensor
    d: torch.Tensor


def extract(data_dir: str | None, cipher: list[Any], backbone: str, max_length: int, batch: int) -> dict[str, Any]:
    """The frozen backbone's features of the train and test splits of CLINC150 under ``cipher`` (one domain each)."""
    from inflora.backbones import build_backbone
    from inflora.data.ciphers import apply_cipher
    from inflora.data.registry import load_dataset

    dataset = apply_cipher(load_dataset("clinc150", data_dir), cipher)
    model = build_backbone(backbone, max_length=max_length).eval()
    out: dict[str, Any] = {"domains": list(dataset.domain_names or []), "num_classes": len(dataset.class_names)}
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        start, feats, labels = time.perf_counter(), [], []
        for i in range(0, len(split), batch):
            inputs, y = model.collate([split[j] for j in range(i, min(len(split), i + batch))])
            with torch.no_grad():
                feats.append(model(**inputs).float())
            labels.append(y)
        out[name] = (torch.cat(feats), torch.cat(labels), torch.tensor(list(split.domains)))
        print(f"{name}: {len(split)} features in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def mixture_align(weight: torch.Tensor, bias: torch.Tensor, stats: ClassStatistics, components: list[int],
                  labels: list[int], task: int, budget: Budget,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``align_linear`` with several Gaussians per class: component ``components[k]`` of ``stats`` (its
    ``last_task`` is its domain) is labelled ``labels[k]`` and gets ``round(samples_per_class * its share of the
    class's count)`` samples (at least 1) each epoch."""
    label_t = torch.tensor(labels)
    counts = torch.tensor([stats.counts[k] for k in components], dtype=torch.float64)
    totals = torch.zeros(int(label_t.max()) + 1, dtype=torch.float64).index_add_(0, label_t, counts)
    per = (budget.samples_per_class * counts / totals[label_t]).round().clamp_min(1).long()
    means, factors = class_gaussians(stats, components, task, budget.shrink, budget.mean_scale)
    n = int(per.max())
    keep = torch.arange(n).unsqueeze(0) < per.unsqueeze(1)
    y_all = label_t.unsqueeze(1).expand(-1, n)[keep]
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([w, b], lr=budget.lr, momentum=budget.momentum, weight_decay=budget.weight_decay)
    for epoch in range(budget.epochs):
        for group in optimiser.param_groups:
            group["lr"] = alignment_lr(budget.lr, epoch, budget.epochs)
        with torch.no_grad():
            x = draw_samples(means, factors, n, generator)[keep]
            order = torch.randperm(x.shape[0], generator=generator)
            x, y = x[order], y_all[order]
        for i in range(0, x.shape[0], budget.batch_size):
            loss = F.cross_entropy(F.linear(x[i : i + budget.batch_size], w, b), y[i : i + budget.batch_size])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return w.detach(), b.detach()


def ridge_head(train: Features, upto: int, num_classes: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact ridge head (float64) on the raw features of domains ``0..upto``; zero bias."""
    sel = train.d <= upto
    x, y = train.x[sel].double(), F.one_hot(train.y[sel], num_classes).double()
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64), x.T @ y)
    return w.T.float(), torch.zeros(num_classes)


def prototype_head(train: Features, upto: int, num_classes: int, per_domain: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit class means (float64 sums) of domains ``0..upto`` as a linear map of unit features: one row per class,
    or one per (domain, class) with ``per_domain`` (row ``d * num_classes + c``); zero bias, ``-inf`` for rows
    without samples."""
    sel = train.d <= upto
    rows = train.y[sel] + (train.d[sel] * num_classes if per_domain else 0)
    count = (upto + 1) * num_classes if per_domain else num_classes
    sums = torch.zeros(count, train.x.shape[1], dtype=torch.float64).index_add_(0, rows, train.x[sel].double())
    counts = torch.bincount(rows, minlength=count)
    bias = torch.zeros(count).masked_fill(counts == 0, float("-inf"))
    return F.normalize(sums, dim=1).float(), bias


def domain_statistics(train: Features, num_classes: int) -> list[dict[str, float]]:
    """Per domain: the features' mean norm, the share of their energy along their own mean direction, and the mean
    distance of the class means to their centre (how far apart the classes are)."""
    out = []
    for d in range(int(train.d.max()) + 1):
        x, y = train.x[train.d == d].double(), train.y[train.d == d]
        direction = F.normalize(x.mean(0), dim=0)
        means = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
        present = torch.bincount(y, minlength=num_classes) > 0
        means = means[present] / torch.bincount(y, minlength=num_classes)[present, None]
        out.append({"norm": x.norm(dim=1).mean().item(),
                    "mean_direction_energy": ((x @ direction) ** 2).sum().item() / (x**2).sum().item(),
                    "class_mean_spread": (means - means.mean(0)).norm(dim=1).mean().item()})
    return out


def run_head(head: str, train: Features, test: Features, num_classes: int, num_domains: int, budget: Budget,
             lam: float, seed: int) -> list[list[float]]:
    """Accuracy matrix (rows: after domain t; columns: domains 0..t, in %) of ``head``."""
    dim = train.x.shape[1]
    pooled, mixture = ClassStatistics(dim), ClassStatistics(dim)
    matrix = []
    for t in range(num_domains):
        sel = train.d == t
        pooled.add(train.x[sel], train.y[sel], t)
        mixture.add(train.x[sel], train.y[sel] + t * num_classes, t)  # component: (domain, class)
        generator = torch.Generator().manual_seed(seed + t)
        zeros_w, zeros_b = torch.zeros(num_classes, dim), torch.zeros(num_classes)
        if head == "pooled":
            w, b, _ = align_linear(zeros_w, zeros_b, [num_classes], pooled, pooled.classes, t, budget, generator)
        elif head == "mixture":
            components = mixture.classes
            w, b = mixture_align(zeros_w, zeros_b, mixture, components, [k % num_classes for k in components], t,
                                 budget, generator)
        elif head == "ridge":
            w, b = ridge_head(train, t, num_classes, lam)
        else:
            w, b = prototype_head(train, t, num_classes, per_domain=head == "prototype-domain")
        row = []
        for d in range(t + 1):
            s = test.d == d
            x = F.normalize(test.x[s], dim=1) if head.startswith("prototype") else test.x[s]
            row.append(100.0 * ((x @ w.T + b).argmax(1) % num_classes == test.y[s]).float().mean().item())
        matrix.append(row)
        print(f"{head:16s} after domain {t}: " + ", ".join(f"{a:.1f}" for a in row), flush=True)
    return matrix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with clinc150/ (default: $INFLORA_DATA)")
    p.add_argument("--cipher", default="plain,1,2,3,4", help="domains: 'plain' and cipher seeds, comma-separated")
    p.add_argument("--backbone", default="all-MiniLM-L6-v2")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--cache", type=Path, default=None,
                   help="features file: read when it exists (same domains), else written (extraction is slow)")
    p.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated, of {', '.join(HEADS)}")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--samples-per-class", type=int, default=256)
    p.add_argument("--ridge-lambda", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the matrices and summaries here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    heads = [h.strip() for h in a.heads.split(",") if h.strip()]
    if not heads or any(h not in HEADS for h in heads):
        p.error(f"--heads takes {', '.join(HEADS)}; got {a.heads!r}")
    cipher: list[Any] = [c if c == "plain" else int(c) for c in a.cipher.split(",")]
    key = {"cipher": cipher, "backbone": a.backbone, "max_length": a.max_length}
    if a.cache is not None and a.cache.exists():
        data = torch.load(a.cache)
        if data.get("key") != key:
            p.error(f"{a.cache} holds features of {data.get('key')}, not {key}: give another --cache")
    else:
        data = extract(a.data_dir, cipher, a.backbone, a.max_length, 256) | {"key": key}
        if a.cache is not None:
            torch.save(data, a.cache)
    train, test = Features(*data["train"]), Features(*data["test"])
    budget = Budget(epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, samples_per_class=a.samples_per_class)
    results: dict[str, Any] = {"domains": data["domains"], "budget": vars(budget), "ridge_lambda": a.ridge_lambda}
    results["statistics"] = domain_statistics(train, data["num_classes"])
    for name, s in zip(data["domains"], results["statistics"], strict=True):
        print(f"{name}: mean feature norm {s['norm']:.2f}, energy along its mean direction "
              f"{100 * s['mean_direction_energy']:.0f} %, class means' distance to their centre "
              f"{s['class_mean_spread']:.2f} (training features)")
    for head in heads:
        start = time.perf_counter()
        matrix = run_head(head, train, test, data["num_classes"], len(data["domains"]), budget, a.ridge_lambda,
                          a.seed)
        results[head] = {"matrix": matrix, "A_T": final_accuracy(matrix), "forgetting": forgetting(matrix),
                         "seconds": time.perf_counter() - start}
    print(f"domains: {', '.join(data['domains'])}; alignment: {budget.epochs} epochs, lr {budget.lr}, "
          f"weight decay {budget.weight_decay}")
    for head in heads:
        r = results[head]
        last = ", ".join(f"{x:.1f}" for x in r["matrix"][-1])
        print(f"{head:16s} A_T {r['A_T']:6.2f}  forgetting {r['forgetting']:6.2f}  after the last domain: {last}")
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1))
    return 0 if all(math.isfinite(results[h]["A_T"]) for h in heads) else 1


if __name__ == "__main__":
    raise SystemExit(main())

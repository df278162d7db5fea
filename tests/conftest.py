"""Shared fixtures: tiny models and data for CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
os.environ["INFLORA_OFFLINE"] = "1"  # tests never download; tests/test_download.py serves local copies and unsets it


def shared_data_dir() -> Path | None:
    """The offline data folder: $INFLORA_DATA, else ../shared/data beside the project."""
    for candidate in (os.environ.get("INFLORA_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "clinc150" / "data_full.json").is_file():
            return Path(candidate)
    return None


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("offline data (../shared/data or $INFLORA_DATA) not found")
    return path


def tiny_vit(seed: int = 0, depth: int = 4) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                             depth=depth, embed_dim=48, num_heads=3)


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


@pytest.fixture
def vit() -> nn.Module:
    return tiny_vit()


def make_image_folder(root: Path, classes: int = 4, train: int = 8, test: int = 4, size: int = 32,
                      seed: int = 0) -> Path:
    """A small real image-folder dataset: each class a distinct colour pattern plus noise, as PNG files."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    for c in range(classes):
        base = rng.randint(0, 256, size=3)
        for split, n in (("train", train), ("test", test)):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(base + rng.randint(-40, 40, size=(size, size, 3)), 0, 255).astype("uint8")
                img[: size // 2, :: 2 + c] = 255 - base  # class-specific stripes
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


TINY_VIT_OVERRIDES = [
    "model.backbone=timm:vit_tiny_patch16_224",
    "model.pretrained=false",
    "model.options={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
    "data.name=image-folder",
    "data.transforms=cifar",
    "train.progress=false",
    "train.batch_size=8",
    "train.eval_batch_size=16",
    "inflora.rank=4",
]


def for_method(overrides: list[str]) -> list[str]:
    """``overrides`` with the rank override moved to the section of the method they choose (``method=...``):
    options belong to their method, and another method's section is an error."""
    method = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("method=")), "inflora")
    out = []
    for o in overrides:
        if o.startswith("inflora.rank=") and method != "inflora":
            if method in ("seqlora", "joint"):
                out.append(f"{method}.rank=" + o.split("=", 1)[1])
            continue
        out.append(o)
    return out

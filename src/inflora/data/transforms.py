"""Image transforms of the reference recipes: inputs scaled to [0, 1], no mean/std normalisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from PIL import Image
from torchvision import transforms as T

__all__ = ["RECIPES", "ToRGB", "image_transforms"]

RECIPES = ("cifar", "imagenet")


class ToRGB:
    """Convert a PIL image of any mode (e.g. grayscale Fashion-MNIST) to RGB; picklable for worker processes."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def image_transforms(
    recipe: Literal["cifar", "imagenet"], train: bool, img_size: int = 224
) -> Callable[[Any], Any]:
    """The reference transform for ``recipe``: PIL image -> float tensor ``3 x img_size x img_size`` in [0, 1].

    * ``cifar``: train ``RandomResizedCrop`` + horizontal flip; test ``Resize((img_size, img_size))``.
    * ``imagenet``: train ``RandomResizedCrop`` + horizontal flip; test ``Resize(img_size * 256 / 224)`` (shorter
      side) + ``CenterCrop(img_size)``.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown transform recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    if img_size <= 0:
        raise ValueError(f"img_size must be positive, got {img_size}")
    steps: list[Callable[[Any], Any]] = [ToRGB()]
    if train:
        steps += [T.RandomResizedCrop(img_size), T.RandomHorizontalFlip()]
    elif recipe == "cifar":
        steps += [T.Resize((img_size, img_size))]
    else:
        steps += [T.Resize(int(img_size * 256 / 224)), T.CenterCrop(img_size)]
    steps.append(T.ToTensor())
    return T.Compose(steps)

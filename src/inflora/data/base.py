"""Core data containers: dataset splits, the continual dataset record and the user-facing error type.

A :class:`Split` yields ``(x, label)`` pairs where ``x`` is a ``str`` (text) or an RGB ``PIL.Image`` (images); its
``labels`` (and ``domains``) are available without loading any sample, which is what scenarios are built from.
Transforms (tokenisation, tensor conversion) are applied on top with :class:`TransformedSplit`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "ContinualDataset",
    "DataError",
    "ImageFileSplit",
    "ListSplit",
    "Split",
    "SubsetSplit",
    "TransformedSplit",
    "as_bool",
    "read_json",
    "to_rgb",
]


class DataError(Exception):
    """A dataset is missing, incomplete or malformed; the message says where it looked and how to get the data."""


def to_rgb(x: Any) -> Image.Image:
    """Convert a PIL image or a ``uint8`` ``HxW`` / ``HxWx3`` array to an RGB ``PIL.Image``."""
    if isinstance(x, Image.Image):
        return x if x.mode == "RGB" else x.convert("RGB")
    if isinstance(x, np.ndarray):
        arr = np.asarray(x, dtype=np.uint8)
        if arr.ndim == 2:
            return Image.fromarray(arr, mode="L").convert("RGB")
        if arr.ndim == 3 and arr.shape[2] == 1:
            return Image.fromarray(arr[:, :, 0], mode="L").convert("RGB")
        if arr.ndim == 3 and arr.shape[2] == 3:
            return Image.fromarray(arr, mode="RGB")
        raise ValueError(f"cannot make an image from an array of shape {arr.shape}")
    raise TypeError(f"cannot make an image from {type(x).__name__}")


class Split(Dataset):
    """One split (train/val/test) of a dataset: ``split[i] -> (x, label)``.

    Subclasses set ``labels`` (class id per sample), ``domains`` (domain id per sample or ``None``) and implement
    :meth:`load`.
    """

    labels: list[int]
    domains: list[int] | None

    def load(self, i: int) -> Any:
        """Load the input of sample ``i`` (``str`` or RGB ``PIL.Image``)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a split of {len(self)} samples")
        return self.load(i), self.labels[i]

    def subset(self, indices: Sequence[int]) -> Split:
        """The samples at ``indices`` (in that order), with their labels and domains."""
        return SubsetSplit(self, indices)


def _check_lengths(n: int, labels: Sequence[int], domains: Sequence[int] | None) -> None:
    if len(labels) != n:
        raise ValueError(f"{n} samples but {len(labels)} labels")
    if domains is not None and len(domains) != n:
        raise ValueError(f"{n} samples but {len(domains)} domain ids")


class ListSplit(Split):
    """An in-memory split: strings, PIL images or ``uint8`` arrays (converted to RGB PIL images on access).

    ``items`` may be any sequence indexable by position, e.g. an ``N x H x W x 3`` numpy array.
    """

    def __init__(
        self, items: Sequence[Any], labels: Sequence[int], domains: Sequence[int] | None = None
    ) -> None:
        _check_lengths(len(items), labels, domains)
        self.items = items
        self.labels = [int(y) for y in labels]
        self.domains = None if domains is None else [int(d) for d in domains]

    def load(self, i: int) -> Any:
        x = self.items[i]
        return x if isinstance(x, str) else to_rgb(x)


class ImageFileSplit(Split):
    """A split of image files, opened lazily with PIL and converted to RGB."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[int],
        domains: Sequence[int] | None = None,
    ) -> None:
        _check_lengths(len(paths), labels, domains)
        self.paths = [str(p) for p in paths]
        self.labels = [int(y) for y in labels]
        self.domains = None if domains is None else [int(d) for d in domains]

    def load(self, i: int) -> Image.Image:
        try:
            with Image.open(self.paths[i]) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {self.paths[i]}: {e}") from e


class SubsetSplit(Split):
    """A view of some samples of another split."""

    def __init__(self, parent: Split, indices: Sequence[int]) -> None:
        self.parent = parent
        self.indices = [int(i) for i in indices]
        n = len(parent)
        bad = [i for i in self.indices if not -n <= i < n]
        if bad:
            raise IndexError(f"subset indices out of range for a split of {n} samples: {bad[:5]}")
        self.labels = [parent.labels[i] for i in self.indices]
        self.domains = None if parent.domains is None else [parent.domains[i] for i in self.indices]

    def load(self, i: int) -> Any:
        return self.parent.load(self.indices[i] % len(self.parent))


class TransformedSplit(Dataset):
    """Wrap a :class:`Split` and apply ``transform`` to each input (and optionally ``target_transform`` to labels)."""

    def __init__(
        self,
        split: Split,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.split = split
        self.transform = transform
        self.target_transform = target_transform

    @property
    def labels(self) -> list[int]:
        """Labels of the wrapped split (before ``target_transform``)."""
        return self.split.labels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.split[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, (self.target_transform(y) if self.target_transform is not None else y)


@dataclass
class ContinualDataset:
    """A dataset ready to be cut into tasks: splits, class names and optional class groups / domains."""

    name: str
    modality: Literal["text", "image"]
    class_names: list[str]
    train: Split
    test: Split
    val: Split | None = None
    class_groups: dict[str, list[int]] | None = None
    domain_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', not {self.modality!r}")
        for split_name, split in self.splits().items():
            labels = np.asarray(split.labels, dtype=np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"{self.name} {split_name}: labels outside 0..{self.num_classes - 1}")
            if self.domain_names is not None and split.domains is None:
                raise ValueError(
                    f"{self.name} {split_name}: domain_names given but the split has no domain ids"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def splits(self) -> dict[str, Split]:
        """The available splits by name (``train``, ``val`` when present, ``test``)."""
        out = {"train": self.train}
        if self.val is not None:
            out["val"] = self.val
        out["test"] = self.test
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits().items())
        return f"ContinualDataset({self.name!r}, {self.modality}, {self.num_classes} classes, {sizes})"


def as_bool(value: Any, name: str) -> bool:
    """Interpret an option value (``bool``, 0/1 or a string such as ``"true"``/``"no"``) as a boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ValueError(f"option {name!r} must be true or false, not {value!r}")


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error becomes a DataError naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def check_every_class(class_names: Sequence[str], splits: dict[str, Sequence[int]], where: Path,
                      what: str = "samples") -> None:
    """Refuse a dataset with a class that has no ``what`` in some split (never start on half a dataset)."""
    for split_name, labels in splits.items():
        present = set(labels)
        empty = [class_names[c] for c in range(len(class_names)) if c not in present]
        if empty:
            raise DataError(
                f"{where}: incomplete data, {len(empty)} class(es) have no {split_name} {what}: {empty[:5]}"
            )

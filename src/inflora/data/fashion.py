"""Fashion-MNIST from its IDX files (the ``dataset-fashion-mnist`` Debian package's or a data folder's)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .base import ContinualDataset, DataError, ListSplit, check_every_class
from .registry import register_dataset

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_SYSTEM_DIR", "read_idx"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Where Debian's package ``dataset-fashion-mnist`` installs the IDX files (fallback location).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not); the header's magic number, sizes and length are checked."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX data has {len(raw) - header} bytes, header {shape} says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


@register_dataset(
    "fashion-mnist", "Fashion-MNIST: 10 classes, 60000/10000 28x28 grayscale images (IDX files)"
)
def fashion_mnist(data_dir: Path) -> ContinualDataset:
    """Fashion-MNIST from the IDX files in ``<data_dir>/fashion-mnist``, else from Debian's
    ``dataset-fashion-mnist`` package (:data:`FASHION_MNIST_SYSTEM_DIR`). Images are converted to RGB on access."""
    folder = data_dir / "fashion-mnist"
    found = {k: _find_idx(folder, v) for k, v in _FMNIST_FILES.items()}
    if any(found.values()) and not all(found.values()):
        absent = [_FMNIST_FILES[k] for k, v in found.items() if v is None]
        raise DataError(f"Fashion-MNIST in {folder} is incomplete: missing {', '.join(absent)}(.gz)")
    if not all(found.values()):
        folder = FASHION_MNIST_SYSTEM_DIR
        found = {k: _find_idx(folder, v) for k, v in _FMNIST_FILES.items()}
    if not all(found.values()):
        raise DataError(
            f"Fashion-MNIST not found in {data_dir / 'fashion-mnist'} nor in {FASHION_MNIST_SYSTEM_DIR}. Put the "
            f"four IDX files ({', '.join(v + '.gz' for v in _FMNIST_FILES.values())}, from "
            "https://github.com/zalandoresearch/fashion-mnist) in the first, or install the Debian package: "
            "apt-get install dataset-fashion-mnist"
        )
    paths: dict[str, Path] = {k: v for k, v in found.items() if v is not None}
    splits = {}
    for split_name in ("train", "test"):
        img_path, lab_path = paths[f"{split_name}_images"], paths[f"{split_name}_labels"]
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{img_path}: expected uint8 images N x H x W, got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{lab_path}: expected {len(images)} labels, got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
            raise DataError(f"{lab_path}: labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        splits[split_name] = ListSplit(images, labels.tolist())
    check_every_class(FASHION_MNIST_CLASSES, {k: v.labels for k, v in splits.items()}, folder, what="images")
    return ContinualDataset(
        name="fashion-mnist",
        modality="image",
        class_names=list(FASHION_MNIST_CLASSES),
        train=splits["train"],
        test=splits["test"],
    )

"""Image datasets: CIFAR-100, ImageNet-R, DomainNet, Fashion-MNIST and generic train/test image folders.

Samples are RGB ``PIL.Image`` objects; see :mod:`inflora.data.transforms` for the reference transforms.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import ContinualDataset, DataError, ImageFileSplit, ListSplit, as_bool, check_every_class, read_json
from .registry import register_dataset, user_cache_dir

__all__ = [
    "DOMAINNET_DOMAINS",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    """Image files below ``folder`` (recursively), as sorted POSIX paths relative to ``folder``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        out.extend((rel / f).as_posix() for f in filenames if _is_image(f))
    return sorted(out)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _missing_files(root: Path, relpaths: Iterable[str]) -> list[str]:
    """The ``relpaths`` that are not files under ``root`` (one directory listing per parent folder)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for rel in relpaths:
        parent, _, name = rel.rpartition("/")
        if parent not in listings:
            try:
                listings[parent] = {e.name for e in os.scandir(root / parent) if e.is_file()}
            except OSError:
                listings[parent] = set()
        if name not in listings[parent]:
            missing.append(rel)
    return missing


# ----------------------------------------------------------------------------------------------------- CIFAR-100


@register_dataset("cifar100", "CIFAR-100: 100 classes, 50000/10000 32x32 images (torchvision format)")
def cifar100(data_dir: Path, download: bool = False) -> ContinualDataset:
    """CIFAR-100 read with torchvision from ``<data_dir>/cifar100/cifar-100-python``; images kept as numpy arrays."""
    from torchvision.datasets import CIFAR100

    root = data_dir / "cifar100"
    dl = as_bool(download, "download")
    try:
        train = CIFAR100(str(root), train=True, download=dl)
        test = CIFAR100(str(root), train=False, download=dl)
    except RuntimeError as e:
        raise DataError(
            f"CIFAR-100 not found (or corrupted) in {root}: expected the folder {root / 'cifar-100-python'} "
            f"(extracted from cifar-100-python.tar.gz, https://www.cs.toronto.edu/~kriz/cifar.html). "
            f"Pass --set data.options.download=true to download it there. ({e})"
        ) from e
    except OSError as e:
        raise DataError(f"could not download CIFAR-100 into {root}: {e}") from e
    return ContinualDataset(
        name="cifar100",
        modality="image",
        class_names=list(train.classes),
        train=ListSplit(np.asarray(train.data), train.targets),
        test=ListSplit(np.asarray(test.data), test.targets),
    )


# ----------------------------------------------------------------------------------------------------- ImageNet-R

IMAGENET_R_TRAIN_FRACTION = 0.8


def _split_cache_path(folder: Path, name: str) -> Path:
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return user_cache_dir() / "splits" / "imagenet-r" / digest / name


def _can_write(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=0), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _make_imagenet_r_split(folder: Path, classes: list[str], seed: int) -> dict[str, Any]:
    rng = np.random.RandomState(seed)
    train: list[str] = []
    test: list[str] = []
    for cls in classes:
        files = [f"{cls}/{f}" for f in _images_under(folder / cls)]
        if len(files) < 2:
            raise DataError(
                f"{folder / cls}: {len(files)} image(s); each class needs at least 2 (train and test)"
            )
        perm = rng.permutation(len(files))
        n_train = min(max(round(IMAGENET_R_TRAIN_FRACTION * len(files)), 1), len(files) - 1)
        train.extend(sorted(files[i] for i in perm[:n_train]))
        test.extend(sorted(files[i] for i in perm[n_train:]))
    return {
        "dataset": "imagenet-r",
        "seed": seed,
        "train_fraction": IMAGENET_R_TRAIN_FRACTION,
        "classes": classes,
        "train": train,
        "test": test,
    }


@register_dataset(
    "imagenet-r", "ImageNet-R: 200 classes of renditions, seeded 80/20 train/test split (~24k/6k)"
)
def imagenet_r(data_dir: Path, split_seed: int = 0, num_classes: int | None = 200) -> ContinualDataset:
    """ImageNet-R from ``<data_dir>/imagenet-r/<class folder>/*.jpg``; class names are the sorted folder names.

    The seeded per-class 80/20 split is made once and kept as ``split_seed<seed>.json`` in that folder (or, when
    the folder is not writable, in the user cache); later loads reuse it. ``num_classes`` is the expected number
    of class folders (``None``: any), a guard against a partly extracted archive. Files are never moved.
    """
    folder = data_dir / "imagenet-r"
    how = (
        "Download imagenet-r.tar (Hendrycks et al., https://github.com/hendrycks/imagenet-r) and extract it in "
        f"{data_dir}, so that {folder}/<class folder>/*.jpg exist."
    )
    if not folder.is_dir():
        raise DataError(f"ImageNet-R not found: no folder {folder}. {how}")
    classes = _class_dirs(folder)
    if num_classes is not None and len(classes) != int(num_classes):
        raise DataError(
            f"{folder}: found {len(classes)} class folders, expected {num_classes} (incomplete?). {how}"
        )
    if not classes:
        raise DataError(f"{folder}: no class folders. {how}")
    seed = int(split_seed)
    name = f"split_seed{seed}.json"
    candidates = [folder / name, _split_cache_path(folder, name)]
    split_path = next((p for p in candidates if p.is_file()), None)
    if split_path is not None:
        split = read_json(split_path)
        if not (
            isinstance(split, dict)
            and all(isinstance(split.get(k), list) for k in ("classes", "train", "test"))
        ):
            raise DataError(f"{split_path}: malformed split file; delete it to make a new one")
        if split["classes"] != classes:
            raise DataError(
                f"{split_path} lists other classes than the folders of {folder}; delete it to make a new split"
            )
    else:
        split = _make_imagenet_r_split(folder, classes, seed)
        split_path = candidates[0] if _can_write(folder) else candidates[1]
        try:
            _write_json_atomic(split_path, split)
        except OSError:
            split_path = candidates[1]
            _write_json_atomic(split_path, split)
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split_name in ("train", "test"):
        rel: list[str] = split[split_name]
        missing = _missing_files(folder, rel)
        if missing:
            raise DataError(
                f"{len(missing)} image(s) listed in {split_path} are missing from {folder}, e.g. {missing[0]}; "
                f"restore them or delete the split file to make a new split"
            )
        labels = []
        for r in rel:
            cls = r.split("/", 1)[0]
            if cls not in index:
                raise DataError(f"{split_path}: {r!r} is not in a class folder")
            labels.append(index[cls])
        splits[split_name] = ImageFileSplit([folder / r for r in rel], labels)
    check_every_class(classes, {k: v.labels for k, v in splits.items()}, split_path, what="images")
    return ContinualDataset(
        name="imagenet-r", modality="image", class_names=classes, train=splits["train"], test=splits["test"]
    )


# ----------------------------------------------------------------------------------------------------- DomainNet


def _parse_domainnet_list(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise DataError(f"missing file list {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(
                    f"{path}, line {n}: expected 'relative/path.jpg label', got {line.strip()!r:.100}"
                )
            out.append((parts[0].replace("\\", "/"), int(parts[1])))
    if not out:
        raise DataError(f"{path}: empty file list")
    return out


@register_dataset(
    "domainnet", "DomainNet: 345 classes in 6 domains (domain ids per sample), standard file lists"
)
def domainnet(data_dir: Path, domains: Sequence[str] | str | None = None) -> ContinualDataset:
    """DomainNet from ``<data_dir>/domainnet`` with ``<domain>_train.txt`` / ``<domain>_test.txt`` (lines
    ``relative/path.jpg label``, paths relative to that folder). ``domains`` restricts and orders the domains;
    a sample's domain id is the position of its domain in ``domain_names``. Class names come from the paths
    (``<domain>/<class>/<file>``)."""
    folder = data_dir / "domainnet"
    names = (
        list(DOMAINNET_DOMAINS)
        if domains is None
        else (
            [d.strip() for d in domains.split(",") if d.strip()]
            if isinstance(domains, str)
            else list(domains)
        )
    )
    bad = [d for d in names if d not in DOMAINNET_DOMAINS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(
            f"domainnet: invalid domains {names}; choose distinct ones among {', '.join(DOMAINNET_DOMAINS)}"
        )
    how = (
        "Download each domain's images and its <domain>_train.txt / <domain>_test.txt lists from the DomainNet "
        f"page (https://ai.bu.edu/M3SDA/) and extract them in {folder}, so that e.g. "
        f"{folder}/clipart/<class>/*.jpg and {folder}/clipart_train.txt exist."
    )
    if not folder.is_dir():
        raise DataError(f"DomainNet not found: no folder {folder}. {how}")
    lists = [folder / f"{d}_{s}.txt" for d in names for s in ("train", "test")]
    absent = [p.name for p in lists if not p.is_file()]
    if absent:
        raise DataError(f"DomainNet in {folder} is incomplete: missing {', '.join(absent)}. {how}")
    entries: dict[str, list[tuple[str, int, int]]] = {"train": [], "test": []}
    label_names: dict[int, str] = {}
    for d_idx, d in enumerate(names):
        for split_name in ("train", "test"):
            path = folder / f"{d}_{split_name}.txt"
            rows = _parse_domainnet_list(path)
            for rel, label in rows:
                parts = rel.split("/")
                cname = parts[-2] if len(parts) >= 2 else f"class_{label}"
                if label_names.setdefault(label, cname) != cname:
                    raise DataError(
                        f"{path}: label {label} is {cname!r} here but {label_names[label]!r} elsewhere"
                    )
                entries[split_name].append((rel, label, d_idx))
            missing = _missing_files(folder, [rel for rel, _ in rows])
            if missing:
                raise DataError(
                    f"{len(missing)} image(s) listed in {path} are missing, e.g. {folder / missing[0]}"
                )
    num_classes = max(label_names) + 1
    absent_ids = [c for c in range(num_classes) if c not in label_names]
    if absent_ids:
        raise DataError(f"{folder}: labels must be 0..{num_classes - 1} but {absent_ids[:5]} never occur")
    class_names = [label_names[c] for c in range(num_classes)]
    splits = {
        k: ImageFileSplit([folder / e[0] for e in v], [e[1] for e in v], [e[2] for e in v])
        for k, v in entries.items()
    }
    check_every_class(class_names, {k: v.labels for k, v in splits.items()}, folder, what="images")
    return ContinualDataset(
        name="domainnet",
        modality="image",
        class_names=class_names,
        train=splits["train"],
        test=splits["test"],
        domain_names=names,
    )


# ----------------------------------------------------------------------------------------------------- image folders


@register_dataset(
    "image-folder", "your own images: root/{train,test[,val]}/<class>/*.jpg|png (options root, dataset_name)"
)
def image_folder(
    data_dir: Path, root: str | None = None, dataset_name: str = "image-folder"
) -> ContinualDataset:
    """Images in ``root/train/<class>/``, ``root/test/<class>/`` and optionally ``root/val/<class>/``.

    ``root`` defaults to ``<data_dir>/<dataset_name>`` (a relative ``root`` is read from the data directory).
    Class names are the sorted folder names of ``train``; every class needs images in ``train`` and ``test``.
    """
    base = Path(root).expanduser() if root is not None else Path(dataset_name)
    base = base if base.is_absolute() else data_dir / base
    how = f"Expected {base}/train/<class>/*.jpg and {base}/test/<class>/*.jpg (also .png, .jpeg, ...)."
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}. {how}")
    for required in ("train", "test"):
        if not (base / required).is_dir():
            raise DataError(f"{base} has no {required}/ folder. {how}")
    classes = _class_dirs(base / "train")
    if not classes:
        raise DataError(f"{base / 'train'} has no class folders. {how}")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, ImageFileSplit] = {}
    for split_name in ("train", "val", "test"):
        split_dir = base / split_name
        if not split_dir.is_dir():
            continue
        paths: list[Path] = []
        labels: list[int] = []
        for cls in _class_dirs(split_dir):
            if cls not in index:
                raise DataError(f"{split_dir / cls}: class {cls!r} is not in {base / 'train'}")
            files = _images_under(split_dir / cls)
            if not files:
                raise DataError(
                    f"{split_dir / cls}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)"
                )
            paths.extend(split_dir / cls / f for f in files)
            labels.extend([index[cls]] * len(files))
        splits[split_name] = ImageFileSplit(paths, labels)
    check_every_class(classes, {k: v.labels for k, v in splits.items() if k != "val"}, base, what="images")
    return ContinualDataset(
        name=dataset_name,
        modality="image",
        class_names=classes,
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
    )

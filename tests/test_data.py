"""Tests of the dataset loaders, the registry and the transforms (CPU, small data)."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inflora.data import (
    ContinualDataset,
    DataError,
    ImageFileSplit,
    ListSplit,
    TransformedSplit,
    image_transforms,
    list_datasets,
    load_dataset,
    read_idx,
    resolve_data_dir,
)
from inflora.data import fashion as fashion_mod
from inflora.data import vision as vision_mod


def _shared_data() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data"]
    if os.environ.get("INFLORA_DATA"):
        candidates.append(Path(os.environ["INFLORA_DATA"]))
    return next((p for p in candidates if (p / "clinc150").is_dir()), None)


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared data folder (../shared/data) not found")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _png(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# ------------------------------------------------------------------------------------------ registry


def test_list_datasets_has_builtins() -> None:
    names = list_datasets()
    for name in (
        "clinc150",
        "banking77",
        "text-files",
        "cifar100",
        "imagenet-r",
        "domainnet",
        "fashion-mnist",
        "image-folder",
    ):
        assert names.get(name)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*banking77.*clinc150"):
        load_dataset("nope")


def test_unknown_option_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no option.*colour"):
        load_dataset("clinc150", tmp_path, colour="red")
    with pytest.raises(ValueError, match=r"needs option"):
        load_dataset("text-files", tmp_path, train="a.csv")


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFLORA_DATA", raising=False)
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()
    assert resolve_data_dir(None) == tmp_path / "cache" / "inflora" / "data"
    monkeypatch.setenv("INFLORA_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == (tmp_path / "env").resolve()
    assert resolve_data_dir(tmp_path / "x") == (tmp_path / "x").resolve()


def test_download_option_accepted_everywhere(tmp_path: Path) -> None:
    # not downloadable: the option is ignored and the usual "how to get it" error appears
    with pytest.raises(DataError, match=r"imagenet-r"):
        load_dataset("imagenet-r", tmp_path, download=False)


# ------------------------------------------------------------------------------------------ real text data


@needs_shared
def test_clinc150_counts_and_groups() -> None:
    ds = load_dataset("clinc150", SHARED)
    assert ds.modality == "text" and ds.num_classes == 150
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15000, 3000, 4500)
    assert ds.class_groups is not None and len(ds.class_groups) == 10
    assert all(len(g) == 15 for g in ds.class_groups.values())
    flat = [c for g in ds.class_groups.values() for c in g]
    assert flat == list(range(150))  # domains are contiguous blocks
    x, y = ds.train[0]
    assert isinstance(x, str) and 0 <= y < 150
    assert all(not n.startswith("oos") for n in ds.class_names)
    assert np.bincount(ds.train.labels).tolist() == [100] * 150


@needs_shared
def test_banking77_counts() -> None:
    ds = load_dataset("banking77", SHARED)
    assert ds.num_classes == 77 and ds.val is None
    assert (len(ds.train), len(ds.test)) == (10003, 3080)
    assert ds.class_names[0] == "card_arrival"
    x, y = ds.test[5]
    assert isinstance(x, str) and isinstance(y, int)


def test_clinc150_missing_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:  # conftest sets INFLORA_OFFLINE: no download
        load_dataset("clinc150", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "clinc150") in msg and "clinc/oos-eval" in msg and "--data-dir" in msg
    assert "INFLORA_OFFLINE" in msg and not (tmp_path / "clinc150").exists()


def test_banking77_missing_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"PolyAI-LDN/task-specific-datasets") as e:
        load_dataset("banking77", tmp_path, download=False)
    assert str(tmp_path / "banking77") in str(e.value) and "data.options.download=false" in str(e.value)


def test_clinc150_malformed_json(tmp_path: Path) -> None:
    folder = tmp_path / "clinc150"
    folder.mkdir()
    (folder / "domains.json").write_text('{"d": ["a", "b"]}')
    (folder / "data_full.json").write_text('{"train": [["hi", "a"],\n ["yo" "b"]]}')
    with pytest.raises(DataError, match=r"data_full.json: malformed JSON at line 2"):
        load_dataset("clinc150", tmp_path)


def test_clinc150_incomplete_class(tmp_path: Path) -> None:
    folder = tmp_path / "clinc150"
    folder.mkdir()
    (folder / "domains.json").write_text('{"d": ["a", "b"]}')
    full = {
        "train": [["x", "a"], ["y", "b"]],
        "val": [["x", "a"], ["y", "b"]],
        "test": [["x", "a"], ["o", "oos"]],
    }
    (folder / "data_full.json").write_text(json.dumps(full))
    with pytest.raises(DataError, match=r"no test samples.*'b'"):
        load_dataset("clinc150", tmp_path)
    full["test"].append(["z", "c"])
    (folder / "data_full.json").write_text(json.dumps(full))
    with pytest.raises(DataError, match=r"test record 2: intent 'c' is not in domains.json"):
        load_dataset("clinc150", tmp_path)


def test_banking77_malformed_csv(tmp_path: Path) -> None:
    folder = tmp_path / "banking77"
    folder.mkdir()
    (folder / "categories.json").write_text('["a", "b"]')
    (folder / "train.csv").write_text("text,category\nhello,a\nbye,b\n")
    (folder / "test.csv").write_text("text,category\nhello,a\nbye,b,extra\n")
    with pytest.raises(DataError, match=r"test.csv, line 3: expected 2 fields"):
        load_dataset("banking77", tmp_path)
    (folder / "test.csv").write_text("text,category\nhello,a\nbye,zzz\n")
    with pytest.raises(DataError, match=r"test.csv, line 3: label 'zzz' is not in categories.json"):
        load_dataset("banking77", tmp_path)
    (folder / "test.csv").write_text("text,label\nhello,a\n")
    with pytest.raises(DataError, match=r"line 1: header .* lacks column"):
        load_dataset("banking77", tmp_path)


# ------------------------------------------------------------------------------------------ text-files


def test_text_files_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text('text,label\n"hi, there",greet\nbye,leave\nhello,greet\n')
    (tmp_path / "test.jsonl").write_text(
        '{"text": "yo", "label": "greet"}\n\n{"text": "ciao", "label": "leave"}\n'
    )
    ds = load_dataset("text-files", tmp_path, train="train.csv", test=str(tmp_path / "test.jsonl"))
    assert ds.class_names == ["greet", "leave"]
    assert ds.train[0] == ("hi, there", 0) and ds.test[1] == ("ciao", 1)
    assert ds.val is None and ds.name == "text-files"


def test_text_files_columns_json_array_and_numeric_labels(tmp_path: Path) -> None:
    rows = [{"utt": f"s{i}", "y": i % 12} for i in range(24)]
    (tmp_path / "tr.json").write_text(json.dumps(rows))
    (tmp_path / "va.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:12]))
    ds = load_dataset(
        "text-files",
        tmp_path,
        train="tr.json",
        test="va.jsonl",
        val="va.jsonl",
        text_column="utt",
        label_column="y",
        dataset_name="mine",
    )
    assert ds.class_names == [str(i) for i in range(12)]  # numeric order, not "10" < "2"
    assert ds.val is not None and len(ds.val) == 12 and ds.name == "mine"
    assert ds.train[11] == ("s11", 11)


def test_text_files_errors(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\nhi,a\n")
    (tmp_path / "test.csv").write_text("text,label\nhi,a\nbye,b\n")
    with pytest.raises(DataError, match=r"test.csv, line 3: label 'b' is not in the training file"):
        load_dataset("text-files", tmp_path, train="train.csv", test="test.csv")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "missing.csv"))):
        load_dataset("text-files", tmp_path, train="missing.csv", test="test.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "a"}\n{"text": "b", label: 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: malformed JSON"):
        load_dataset("text-files", tmp_path, train="bad.jsonl", test="test.csv")
    (tmp_path / "nolabel.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=r"nolabel.jsonl, line 1: missing field"):
        load_dataset("text-files", tmp_path, train="nolabel.jsonl", test="test.csv")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match=r"unsupported file type"):
        load_dataset("text-files", tmp_path, train="x.txt", test="test.csv")


# ------------------------------------------------------------------------------------------ image-folder


def test_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for split, n in (("train", 3), ("test", 2)):
        for cls, color in (("dog", (255, 0, 0)), ("cat", (0, 255, 0))):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", color)
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset("image-folder", tmp_path, dataset_name="pets")
    assert ds.class_names == ["cat", "dog"] and ds.modality == "image" and ds.name == "pets"
    assert (len(ds.train), len(ds.test)) == (6, 4)
    img, y = ds.train[0]
    assert (
        isinstance(img, Image.Image) and img.mode == "RGB" and y == 0 and img.getpixel((0, 0)) == (0, 255, 0)
    )
    same = load_dataset("image-folder", tmp_path, root=str(root))
    assert same.train.labels == ds.train.labels


def test_image_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    with pytest.raises(DataError, match=re.escape(str(root))):
        load_dataset("image-folder", tmp_path, root="imgs")
    _png(root / "train" / "a" / "0.png")
    _png(root / "test" / "a" / "0.png")
    (root / "train" / "b").mkdir()
    with pytest.raises(DataError, match=r"empty class folder"):
        load_dataset("image-folder", tmp_path, root="imgs")
    _png(root / "train" / "b" / "0.png")
    with pytest.raises(DataError, match=r"no test images.*'b'"):
        load_dataset("image-folder", tmp_path, root="imgs")
    _png(root / "test" / "b" / "0.png")
    _png(root / "test" / "c" / "0.png")
    with pytest.raises(DataError, match=r"class 'c' is not in"):
        load_dataset("image-folder", tmp_path, root="imgs")


def test_image_file_split_bad_image(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad.png"):
        ImageFileSplit([tmp_path / "bad.png"], [0])[0]


# ------------------------------------------------------------------------------------------ Fashion-MNIST / IDX


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


def _fake_fmnist(folder: Path, n_train: int = 20, n_test: int = 10) -> None:
    rng = np.random.RandomState(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.randint(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_read_idx_roundtrip_and_errors(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    _write_idx(tmp_path / "b", arr, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr) and np.array_equal(read_idx(tmp_path / "b"), arr)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match=r"bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "b").read_bytes()[:-3])
    with pytest.raises(DataError, match=r"header .* says 24"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_data_dir(tmp_path: Path) -> None:
    _fake_fmnist(tmp_path / "fashion-mnist")
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
    assert (len(ds.train), len(ds.test)) == (20, 10)
    img, y = ds.train[3]
    assert img.mode == "RGB" and img.size == (28, 28) and y == 3
    assert img.getpixel((5, 7))[0] == img.getpixel((5, 7))[2]  # gray replicated to RGB


def test_fashion_mnist_incomplete_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fmnist(tmp_path / "fashion-mnist")
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"incomplete: missing t10k-labels"):
        load_dataset("fashion-mnist", tmp_path)
    monkeypatch.setattr(fashion_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist", tmp_path / "empty")
    assert str(tmp_path / "empty" / "fashion-mnist") in str(e.value)


@pytest.mark.skipif(
    not fashion_mod.FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_debian_package(tmp_path: Path) -> None:
    ds = load_dataset("fashion-mnist", tmp_path)
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    img, _ = ds.test[0]
    assert img.size == (28, 28) and img.mode == "RGB"


# ------------------------------------------------------------------------------------------ ImageNet-R


def _tiny_imagenet_r(root: Path, sizes: dict[str, int]) -> list[Path]:
    files = []
    for cls, n in sizes.items():
        for i in range(n):
            p = root / "imagenet-r" / cls / f"art_{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (i, 0, 0)).save(p)
            files.append(p)
    return files


def test_imagenet_r_split_file_deterministic(tmp_path: Path) -> None:
    files = _tiny_imagenet_r(tmp_path, {"n01": 10, "n02": 5, "n03": 2})
    ds = load_dataset("imagenet-r", tmp_path, num_classes=3)
    split_file = tmp_path / "imagenet-r" / "split_seed0.json"
    assert split_file.is_file()
    assert ds.class_names == ["n01", "n02", "n03"]
    assert np.bincount(ds.train.labels).tolist() == [8, 4, 1] and np.bincount(ds.test.labels).tolist() == [
        2,
        1,
        1,
    ]
    assert all(p.is_file() for p in files)  # nothing moved
    assert set(ds.train.paths).isdisjoint(ds.test.paths)
    # later loads read the split file (even if it would be made differently now)
    content = json.loads(split_file.read_text())
    again = load_dataset("imagenet-r", tmp_path, num_classes=3)
    assert again.train.paths == ds.train.paths and json.loads(split_file.read_text()) == content
    # same seed elsewhere -> same split; other seed -> another file
    other = tmp_path / "copy"
    _tiny_imagenet_r(other, {"n01": 10, "n02": 5, "n03": 2})
    rel = [
        Path(p).relative_to(other / "imagenet-r").as_posix()
        for p in load_dataset("imagenet-r", other, num_classes=3).train.paths
    ]
    assert rel == content["train"]
    s1 = load_dataset("imagenet-r", tmp_path, num_classes=3, split_seed=1)
    assert (tmp_path / "imagenet-r" / "split_seed1.json").is_file() and len(s1.train) == 13
    img, _ = ds.test[0]
    assert img.mode == "RGB"


def test_imagenet_r_not_writable_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_imagenet_r(tmp_path, {"a": 3, "b": 3})
    monkeypatch.setattr(vision_mod, "_can_write", lambda folder: False)
    ds = load_dataset("imagenet-r", tmp_path, num_classes=None)
    assert not (tmp_path / "imagenet-r" / "split_seed0.json").exists()
    cached = list((tmp_path / "cache" / "inflora" / "splits").rglob("split_seed0.json"))
    assert len(cached) == 1
    assert load_dataset("imagenet-r", tmp_path, num_classes=None).train.paths == ds.train.paths


def test_imagenet_r_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "imagenet-r"))):
        load_dataset("imagenet-r", tmp_path)
    files = _tiny_imagenet_r(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match=r"found 2 class folders, expected 200"):
        load_dataset("imagenet-r", tmp_path)
    load_dataset("imagenet-r", tmp_path, num_classes=2)
    files[0].unlink()
    with pytest.raises(DataError, match=r"missing from"):
        load_dataset("imagenet-r", tmp_path, num_classes=2)
    (tmp_path / "imagenet-r" / "split_seed0.json").write_text("{broken")
    with pytest.raises(DataError, match=r"split_seed0.json: malformed JSON"):
        load_dataset("imagenet-r", tmp_path, num_classes=2)


# ------------------------------------------------------------------------------------------ DomainNet


def _tiny_domainnet(root: Path, domains: tuple[str, ...] = ("clipart", "real")) -> None:
    base = root / "domainnet"
    for d in domains:
        for split, n in (("train", 2), ("test", 1)):
            lines = []
            for label, cls in enumerate(("aircraft_carrier", "zebra", "the_eiffel_tower")):
                for i in range(n):
                    rel = f"{d}/{cls}/{d}_{split}_{i}.jpg"
                    p = base / rel
                    p.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (3, 3)).save(p)
                    lines.append(f"{rel} {label}")
            (base / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_lists(tmp_path: Path) -> None:
    _tiny_domainnet(tmp_path)
    ds = load_dataset("domainnet", tmp_path, domains=["real", "clipart"])
    assert ds.domain_names == ["real", "clipart"]
    assert ds.class_names == ["aircraft_carrier", "zebra", "the_eiffel_tower"]
    assert (len(ds.train), len(ds.test)) == (12, 6)
    assert (
        ds.train.domains is not None and ds.train.domains[:6] == [0] * 6 and ds.train.domains[6:] == [1] * 6
    )
    assert isinstance(ds.train, ImageFileSplit)
    assert ds.train.paths[0].endswith("real/aircraft_carrier/real_train_0.jpg")
    img, y = ds.test[1]
    assert img.mode == "RGB" and y == 1
    one = load_dataset("domainnet", tmp_path, domains="clipart")
    assert one.domain_names == ["clipart"] and len(one.train) == 6


def test_domainnet_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "domainnet"))):
        load_dataset("domainnet", tmp_path)
    _tiny_domainnet(tmp_path)
    with pytest.raises(DataError, match=r"missing infograph_train.txt"):
        load_dataset("domainnet", tmp_path)
    with pytest.raises(ValueError, match=r"invalid domains"):
        load_dataset("domainnet", tmp_path, domains=["cartoon"])
    lst = tmp_path / "domainnet" / "real_test.txt"
    lst.write_text(lst.read_text() + "real/zebra/x.jpg notanumber\n")
    with pytest.raises(DataError, match=r"real_test.txt, line 4: expected"):
        load_dataset("domainnet", tmp_path, domains=["real"])
    lst.write_text("real/zebra/gone.jpg 1\n")
    with pytest.raises(DataError, match=r"missing, e.g.*gone.jpg"):
        load_dataset("domainnet", tmp_path, domains=["real"])


# ------------------------------------------------------------------------------------------ CIFAR-100 (no data here)


def test_cifar100_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.options\.download=true") as e:
        load_dataset("cifar100", tmp_path)
    assert str(tmp_path / "cifar100") in str(e.value)


# ------------------------------------------------------------------------------------------ splits & transforms


def test_list_split_subset_and_transform() -> None:
    arrays = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    split = ListSplit(arrays, [0, 1, 2, 1], domains=[0, 0, 1, 1])
    sub = split.subset([3, 1])
    assert sub.labels == [1, 1] and sub.domains == [1, 0] and len(sub) == 2
    img, y = sub[0]
    assert img.size == (6, 5) and img.mode == "RGB" and y == 1
    gray = ListSplit([np.zeros((7, 7), dtype=np.uint8), Image.new("L", (3, 3))], [0, 1])
    assert gray[0][0].mode == "RGB" and gray[1][0].mode == "RGB"
    texts = ListSplit(["a", "b"], [0, 1])
    assert texts[-1] == ("b", 1)
    with pytest.raises(IndexError):
        texts[2]
    with pytest.raises(ValueError, match=r"2 samples but 1 labels"):
        ListSplit(["a", "b"], [0])
    t = TransformedSplit(split, image_transforms("cifar", train=False, img_size=16))
    x, y = t[2]
    assert x.shape == (3, 16, 16) and y == 2 and t.labels == split.labels


def test_continual_dataset_checks_labels() -> None:
    with pytest.raises(ValueError, match=r"labels outside"):
        ContinualDataset("x", "text", ["a"], ListSplit(["s"], [1]), ListSplit(["s"], [0]))


@pytest.mark.parametrize("recipe", ["cifar", "imagenet"])
@pytest.mark.parametrize("train", [True, False])
def test_image_transforms(recipe: str, train: bool) -> None:
    tf = image_transforms(recipe, train=train, img_size=32)  # type: ignore[arg-type]
    x = tf(Image.new("L", (50, 40), 255))
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) == 1.0  # [0, 1], not normalised


def test_image_transforms_pipeline_steps() -> None:
    names = [type(s).__name__ for s in image_transforms("imagenet", train=False).transforms]
    assert names == ["ToRGB", "Resize", "CenterCrop", "ToTensor"]
    assert image_transforms("imagenet", train=False).transforms[1].size == 256
    assert image_transforms("cifar", train=False).transforms[1].size == (224, 224)
    assert [type(s).__name__ for s in image_transforms("cifar", train=True).transforms] == [
        "ToRGB",
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ToTensor",
    ]
    with pytest.raises(ValueError, match=r"unknown transform recipe"):
        image_transforms("mnist", train=True)  # type: ignore[arg-type]

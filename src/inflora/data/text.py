"""Text datasets: CLINC150, BANKING77 and the user's own CSV / JSON-lines files.

Inputs are raw strings; tokenisation happens later (see :class:`~inflora.data.base.TransformedSplit`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .base import ContinualDataset, DataError, ListSplit, as_bool, check_every_class, read_json
from .download import Source, ensure_files
from .registry import register_dataset

__all__ = ["BANKING77", "CLINC150", "read_text_records"]

CLINC150 = Source(
    name="clinc150",
    title="CLINC150",
    base_url="https://raw.githubusercontent.com/clinc/oos-eval/828f8093932c8fe6ca7936c3d2e52903b1c523de/data/",
    files={
        "data_full.json": "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0",
        "domains.json": "b947b579d3b8e74b06f93b01083d8efaff2888b43a3e362533bd88a6e1211b3a",
    },
    how="Get data/data_full.json and data/domains.json from the GitHub repository clinc/oos-eval (commit "
        "828f8093932c8fe6ca7936c3d2e52903b1c523de) and put them in the data directory's clinc150/ folder.",
)
BANKING77 = Source(
    name="banking77",
    title="BANKING77",
    base_url="https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/"
             "57ec275d8078af65b7731c2a98be812d844a6d6b/banking_data/",
    files={
        "train.csv": "b06e26ac675513959a63135f11b94ea7786ed02da65db93a5650d8838cbc664b",
        "test.csv": "d12d6e3bc4c3103966ae786dc435913c0c563dfa328f5a3646d0e62cfeeb474d",
        "categories.json": "53261da888122daf2d120d925458631d9619e15d82e56052e7a42e535ce32b63",
    },
    how="Get train.csv, test.csv and categories.json from the folder banking_data/ of the GitHub repository "
        "PolyAI-LDN/task-specific-datasets (commit 57ec275d8078af65b7731c2a98be812d844a6d6b) and put them in the "
        "data directory's banking77/ folder.",
)

Record = tuple[str, str, str]  # (text, label, where: "file, line N")


def _mirror(mirror: str | None) -> str | None:
    if mirror is not None and not isinstance(mirror, str):
        raise ValueError(f"option 'mirror' must be a URL, not {mirror!r}")
    return mirror or None


@register_dataset(
    "clinc150", "CLINC150 intents: 150 in-scope intents in 10 domains, train/val/test 15000/3000/4500"
)
def clinc150(data_dir: Path, download: bool = True, mirror: str | None = None) -> ContinualDataset:
    """CLINC150 (``data_full.json`` + ``domains.json``), out-of-scope samples excluded; downloaded into
    ``data_dir/clinc150`` on first use unless ``download`` is false (see :mod:`inflora.data.download`).

    Class ids follow ``domains.json`` flattened in file order, so each domain's 15 intents are contiguous;
    ``class_groups`` maps each domain to its intent ids.
    """
    folder = ensure_files(data_dir, CLINC150, as_bool(download, "download"), _mirror(mirror))
    domains = read_json(folder / "domains.json")
    if not isinstance(domains, dict) or not all(
        isinstance(v, list) and all(isinstance(i, str) for i in v) for v in domains.values()
    ):
        raise DataError(f"{folder / 'domains.json'}: expected {{domain: [intent, ...]}}")
    class_names: list[str] = []
    class_groups: dict[str, list[int]] = {}
    for domain, intents in domains.items():
        class_groups[domain] = list(range(len(class_names), len(class_names) + len(intents)))
        class_names.extend(intents)
    if len(set(class_names)) != len(class_names):
        dup = sorted({c for c in class_names if class_names.count(c) > 1})
        raise DataError(f"{folder / 'domains.json'}: intents listed in more than one domain: {dup[:5]}")
    index = {c: i for i, c in enumerate(class_names)}

    full = read_json(folder / "data_full.json")
    path = folder / "data_full.json"
    if not isinstance(full, dict) or not all(k in full for k in ("train", "val", "test")):
        raise DataError(f"{path}: expected an object with keys 'train', 'val' and 'test'")
    splits: dict[str, ListSplit] = {}
    for split_name in ("train", "val", "test"):
        texts: list[str] = []
        labels: list[int] = []
        for n, rec in enumerate(full[split_name]):
            if not (isinstance(rec, list) and len(rec) == 2 and all(isinstance(v, str) for v in rec)):
                raise DataError(f"{path}: {split_name} record {n}: expected [text, intent], got {rec!r:.80}")
            text, intent = rec
            if intent == "oos":
                continue
            if intent not in index:
                raise DataError(f"{path}: {split_name} record {n}: intent {intent!r} is not in domains.json")
            texts.append(text)
            labels.append(index[intent])
        splits[split_name] = ListSplit(texts, labels)
    check_every_class(class_names, {k: v.labels for k, v in splits.items()}, path)
    return ContinualDataset(
        name="clinc150",
        modality="text",
        class_names=class_names,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_groups=class_groups,
    )


@register_dataset("banking77", "BANKING77: 77 banking intents, train/test 10003/3080 (no val split)")
def banking77(data_dir: Path, download: bool = True, mirror: str | None = None) -> ContinualDataset:
    """BANKING77 (``train.csv``, ``test.csv`` with header ``text,category``, ``categories.json``); downloaded into
    ``data_dir/banking77`` on first use unless ``download`` is false (see :mod:`inflora.data.download`).

    Class ids follow the order of ``categories.json``.
    """
    folder = ensure_files(data_dir, BANKING77, as_bool(download, "download"), _mirror(mirror))
    class_names = read_json(folder / "categories.json")
    if not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names) and class_names):
        raise DataError(f"{folder / 'categories.json'}: expected a non-empty JSON list of category names")
    if len(set(class_names)) != len(class_names):
        raise DataError(f"{folder / 'categories.json'}: duplicate category names")
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split_name in ("train", "test"):
        records = read_text_records(folder / f"{split_name}.csv", "text", "category")
        splits[split_name] = _to_split(records, index, "categories.json")
    check_every_class(class_names, {k: v.labels for k, v in splits.items()}, folder)
    return ContinualDataset(
        name="banking77", modality="text", class_names=class_names, train=splits["train"], test=splits["test"]
    )


def _to_split(records: Iterable[Record], index: dict[str, int], known_from: str) -> ListSplit:
    texts, labels = [], []
    for text, label, where in records:
        if label not in index:
            raise DataError(f"{where}: label {label!r} is not in {known_from}")
        texts.append(text)
        labels.append(index[label])
    return ListSplit(texts, labels)


def _label_str(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label must be a string or an integer, got {value!r:.80}")
    label = str(value).strip()
    if not label:
        raise DataError(f"{where}: empty label")
    return label


def _row(obj: Any, text_column: str, label_column: str, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [c for c in (text_column, label_column) if c not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; fields present: {sorted(obj)[:10]}")
    text = obj[text_column]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_column!r} must be a string, got {text!r:.80}")
    return text, _label_str(obj[label_column], where), where


def read_text_records(path: Path, text_column: str = "text", label_column: str = "label") -> list[Record]:
    """Read ``(text, label, where)`` records from a CSV (``.csv``) or JSON-lines / JSON-array (``.jsonl``/``.json``)
    file; any problem raises a DataError naming the file and line (or record)."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".csv":
                return _read_csv(f, path, text_column, label_column)
            if suffix in (".jsonl", ".json"):
                content = f.read()
            else:
                raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .jsonl or .json")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from e
    if content.lstrip().startswith("["):
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        return [_row(r, text_column, label_column, f"{path}, record {n}") for n, r in enumerate(rows)]
    records = []
    for n, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: malformed JSON at column {e.colno}: {e.msg}") from e
        records.append(_row(obj, text_column, label_column, f"{path}, line {n}"))
    return records


def _read_csv(f: Any, path: Path, text_column: str, label_column: str) -> list[Record]:
    reader = csv.DictReader(f, strict=True)
    records = []
    try:
        header = reader.fieldnames or []
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise DataError(f"{path}, line 1: header {header} lacks column(s) {missing}")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{where}: expected {len(header)} fields ({', '.join(header)})")
            records.append((row[text_column], _label_str(row[label_column], where), where))
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV: {e}") from e
    return records


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    uniq = set(labels)
    if all(lab.lstrip("-").isdigit() for lab in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


@register_dataset(
    "text-files", "your own text classification files: CSV or JSON lines (options train, test, val)"
)
def text_files(
    data_dir: Path,
    train: str,
    test: str,
    val: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    dataset_name: str = "text-files",
) -> ContinualDataset:
    """Text classification from the user's files (paths relative to the data directory allowed).

    Class names are the sorted distinct labels of ``train`` (numerically when all are integers); a val/test label
    not seen in ``train`` is an error. ``dataset_name`` names the result (``ContinualDataset.name``).
    """
    paths = {"train": train, "val": val, "test": test}
    records: dict[str, list[Record]] = {}
    for split_name, p in paths.items():
        if p is None:
            continue
        path = Path(p).expanduser()
        path = path if path.is_absolute() else data_dir / path
        if not path.is_file():
            raise DataError(
                f"text-files: {split_name} file not found: {path} (relative paths are read from {data_dir})"
            )
        records[split_name] = read_text_records(path, text_column, label_column)
        if not records[split_name]:
            raise DataError(f"text-files: {split_name} file {path} has no records")
    class_names = _sorted_labels(r[1] for r in records["train"])
    index = {c: i for i, c in enumerate(class_names)}
    splits = {k: _to_split(v, index, "the training file") for k, v in records.items()}
    return ContinualDataset(
        name=dataset_name,
        modality="text",
        class_names=class_names,
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
    )

"""Dataset registry: names -> builders, data-directory resolution and :func:`load_dataset`.

A builder is a function ``builder(data_dir: Path, **options) -> ContinualDataset``; its keyword parameters are the
dataset's options (``--set data.<option>=...``).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import ContinualDataset

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "dataset_options",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "resolve_data_dir",
    "user_cache_dir",
]

Builder = Callable[..., ContinualDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder and a one-line description."""

    name: str
    builder: Builder
    description: str


DATASETS: dict[str, DatasetSpec] = {}

_BUILTIN_MODULES = ("inflora.data.text", "inflora.data.vision", "inflora.data.fashion")


def register_dataset(name: str, description: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(data_dir, **options)`` under ``name``."""

    def deco(builder: Builder) -> Builder:
        if name in DATASETS and DATASETS[name].builder is not builder:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = DatasetSpec(name, builder, description)
        return builder

    return deco


def _ensure_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def list_datasets() -> dict[str, str]:
    """Registered dataset names -> one-line descriptions."""
    _ensure_builtins()
    return {name: spec.description for name, spec in sorted(DATASETS.items())}


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/inflora`` or ``~/.cache/inflora``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "inflora"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$INFLORA_DATA``, else ``<user cache>/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get("INFLORA_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return user_cache_dir() / "data"


def dataset_options(name: str) -> dict[str, Any]:
    """The options of dataset ``name`` with their defaults (``inspect.Parameter.empty`` when required)."""
    spec = _spec(name)
    params = list(inspect.signature(spec.builder).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _spec(name: str) -> DatasetSpec:
    _ensure_builtins()
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        valid = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; valid names: {valid}")
    return DATASETS[key]


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, **options: Any
) -> ContinualDataset:
    """Build dataset ``name`` from the resolved data directory.

    Raises ``ValueError`` for an unknown name or option, and :class:`DataError` when the data is missing or
    malformed. Every dataset accepts ``download``; those that cannot be downloaded ignore it.
    """
    spec = _spec(name)
    known = dataset_options(spec.name)
    if "download" in options and "download" not in known:
        # Not downloadable: a missing dataset raises a DataError that says how to get it.
        options.pop("download")
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(sorted(known)) or "(none)"
        raise ValueError(f"dataset {spec.name!r} has no option(s) {', '.join(unknown)}; its options: {valid}")
    missing = sorted(k for k, v in known.items() if v is inspect.Parameter.empty and k not in options)
    if missing:
        raise ValueError(f"dataset {spec.name!r} needs option(s): {', '.join(missing)}")
    return spec.builder(resolve_data_dir(data_dir), **options)

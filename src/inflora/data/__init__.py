"""Datasets, transforms and continual-learning scenarios.

Importing this package registers the built-in datasets (see :func:`list_datasets`).
"""

from . import fashion, text, vision  # noqa: F401  (register the built-in datasets)
from .base import (
    ContinualDataset,
    DataError,
    ImageFileSplit,
    ListSplit,
    Split,
    SubsetSplit,
    TransformedSplit,
)
from .ciphers import Cipher, apply_cipher, text_domains, transform_texts
from .fashion import read_idx
from .registry import (
    DATASETS,
    list_datasets,
    load_dataset,
    register_dataset,
    resolve_data_dir,
    user_cache_dir,
)
from .scenarios import Scenario, Task, class_incremental, domain_incremental, subsample_per_class
from .transforms import image_transforms

__all__ = [
    "DATASETS",
    "Cipher",
    "ContinualDataset",
    "DataError",
    "ImageFileSplit",
    "ListSplit",
    "Scenario",
    "Split",
    "SubsetSplit",
    "Task",
    "TransformedSplit",
    "apply_cipher",
    "class_incremental",
    "domain_incremental",
    "image_transforms",
    "list_datasets",
    "load_dataset",
    "read_idx",
    "register_dataset",
    "resolve_data_dir",
    "subsample_per_class",
    "text_domains",
    "transform_texts",
    "user_cache_dir",
]

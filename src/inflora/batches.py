"""How batches are passed to models: one convention shared by the adapter, the statistics and the engine.

A batch yielded by a data loader may be

* a ``Tensor``: the model is called as ``model(batch)``;
* a ``tuple``/``list`` ``(inputs, labels, ...)``: only ``inputs`` goes to the model;
* a ``Mapping`` (e.g. a Hugging Face tokenizer output): the model is called as ``model(**batch)`` without the
  keys ``labels``/``label``.

``inputs`` itself may be a ``Tensor`` (``model(inputs)``) or a ``Mapping`` (``model(**inputs)``). A text batch's
attention mask is its ``attention_mask`` entry (1 = real token, 0 = padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

LABEL_KEYS = ("labels", "label")


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """Return ``(inputs, labels)`` of a batch (labels ``None`` when the batch has none)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, labels
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"unsupported batch type {type(batch).__name__}: expected a Tensor, a (inputs, labels) tuple or a Mapping"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: keyword arguments for a Mapping, one positional argument otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def attention_mask_of(inputs: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of a Mapping of inputs, else ``None``."""
    if isinstance(inputs, Mapping):
        return inputs.get("attention_mask")
    return None


def move_to(obj: Any, device: torch.device | str) -> Any:
    """Move a tensor, or the tensors inside a Mapping/tuple/list, to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def select_samples(inputs: Any, index: torch.Tensor) -> Any:
    """The samples ``index`` (a long tensor of positions) of a batch of inputs: a Tensor's rows, or the rows of
    every tensor of a Mapping/tuple/list (e.g. a text batch's ``input_ids`` and ``attention_mask``)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: select_samples(v, index) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(select_samples(v, index) for v in inputs)
    raise TypeError(f"cannot select samples of {type(inputs).__name__}")


def batch_size_of(inputs: Any) -> int:
    """Number of samples in ``inputs``."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        return batch_size_of(next(iter(inputs.values())))
    if isinstance(inputs, (tuple, list)):
        return batch_size_of(inputs[0])
    raise TypeError(f"cannot tell the batch size of {type(inputs).__name__}")

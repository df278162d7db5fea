"""An export loaded with plain timm / transformers, and prediction with it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .format import CLASS_NAMES_FILE, CLASSIFIER_FILE, TIMM_WEIGHTS_FILE, ExportError, read_manifest, verify_files


class ExportedModel(nn.Module):
    """An export loaded with plain timm / transformers: ``forward(batch)`` gives logits over all classes.

    ``prepare(raw)`` turns image paths (or PIL images) / texts into a batch; :meth:`predict` does both and returns
    the top-k ``(class index, class name, probability)`` per input.
    """

    def __init__(self, manifest: dict[str, Any], class_names: list[str], model: nn.Module,
                 classifier: nn.Linear | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.manifest, self.class_names = manifest, class_names
        self.model, self.classifier, self.tokenizer = model, classifier, tokenizer
        self.transform: Callable[[Any], torch.Tensor] | None = None
        if manifest["modality"] == "image":
            from ..data import image_transforms

            t = manifest["transforms"]
            self.transform = image_transforms(t["recipe"], False, int(t["img_size"]))

    @property
    def modality(self) -> str:
        return str(self.manifest["modality"])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> ExportedModel:
        """Load an export folder (see the module docstring for the equivalent plain-library lines)."""
        from safetensors import SafetensorError

        folder = Path(model_dir)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        try:
            class_names = json.loads((folder / CLASS_NAMES_FILE).read_text())
            if manifest["kind"] == "timm":
                import timm

                model = timm.create_model(manifest["model_name"], pretrained=False,
                                          num_classes=manifest["num_classes"], **manifest["model_kwargs"])
                model.load_state_dict(_read_tensors(folder / TIMM_WEIGHTS_FILE))
                out = cls(manifest, class_names, model)
            else:
                from transformers import AutoModel, AutoTokenizer

                encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                head = _read_tensors(folder / CLASSIFIER_FILE)
                classifier = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
                classifier.load_state_dict(head)
                out = cls(manifest, class_names, encoder, classifier, tokenizer)
        except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as exc:
            if isinstance(exc, ExportError):
                raise
            raise ExportError(f"{folder}: incomplete or damaged export ({type(exc).__name__}: {exc})") from exc
        if len(class_names) != manifest["num_classes"]:
            raise ExportError(f"{folder}: {len(class_names)} class names for {manifest['num_classes']} classes")
        for p in out.parameters():
            p.requires_grad_(False)
        return out.to(device).eval()

    def forward(self, inputs: Any) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` or a tokenizer output -> logits ``(B, num_classes)``."""
        if self.classifier is None:
            return self.model(inputs)
        hidden = self.model(**inputs).last_hidden_state
        if self.manifest["pooling"] == "cls":
            feats = hidden[:, 0]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            feats = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.manifest.get("normalize"):
            feats = F.normalize(feats, dim=-1)
        return self.classifier(feats)

    def prepare(self, raw: Sequence[Any]) -> Any:
        """Texts -> a tokenizer output; image paths or PIL images -> a ``(B, 3, S, S)`` tensor (test transform)."""
        if self.tokenizer is not None:
            enc = self.tokenizer([str(t) for t in raw], padding=True, truncation=True,
                                 max_length=self.manifest.get("max_length") or 128, return_tensors="pt")
            return {k: v.to(self.device) for k, v in enc.items()}
        assert self.transform is not None
        return torch.stack([self.transform(_open_image(x)) for x in raw]).to(self.device)

    @torch.inference_mode()
    def predict(self, raw: Sequence[Any], top_k: int = 5, batch_size: int = 32) -> list[list[tuple[int, str, float]]]:
        """Top-``top_k`` ``(class index, name, softmax probability)`` of each input, best first."""
        if top_k < 1:
            raise ExportError(f"--top-k must be at least 1, got {top_k}")
        k = min(top_k, len(self.class_names))
        out: list[list[tuple[int, str, float]]] = []
        for start in range(0, len(raw), batch_size):
            probs = self(self.prepare(raw[start : start + batch_size])).float().softmax(-1)
            scores, idx = probs.topk(k, dim=-1)
            out.extend([(int(i), self.class_names[int(i)], float(s)) for s, i in zip(row_s, row_i, strict=True)]
                       for row_s, row_i in zip(scores.cpu(), idx.cpu(), strict=True))
        return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, with an error naming it when it is missing, cut or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path}: damaged or incomplete weights file ({exc}); export the run again") from exc


def _open_image(item: Any) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item
    path = Path(item)
    if not path.is_file():
        raise ExportError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise ExportError(f"cannot read image {path}: {exc}") from exc

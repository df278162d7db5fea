"""Writers of merged models: timm (the model's own state dict with the classifier as its head) and transformers
(``save_pretrained`` plus ``classifier.safetensors``), written to a temporary folder, verified, moved into place."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, HFTextBackbone, TimmBackbone
from ..lora import merged_copy
from .format import (
    _TIMM_LOAD_ONLY,
    CLASS_NAMES_FILE,
    CLASSIFIER_FILE,
    EXPORT_FORMAT,
    MANIFEST_FILE,
    TIMM_WEIGHTS_FILE,
    VERIFY_TOLERANCE,
    ExportError,
    folder_digests,
    read_manifest,
)
from .loaded import ExportedModel


def _json_ready(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{what} is not JSON-serialisable ({exc}): cannot record it in the manifest") from exc


def _timm_data_config(recipe: str, img_size: int) -> dict[str, Any]:
    """timm's description of ``image_transforms(recipe, train=False, img_size)``: no mean/std normalisation."""
    center = recipe != "cifar"
    return {"input_size": (3, img_size, img_size), "interpolation": "bilinear", "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0), "crop_pct": 224 / 256 if center else 1.0,
            "crop_mode": "center" if center else "squash"}


def _classifier_name(model: nn.Module) -> str:
    get = getattr(model, "get_classifier", None)
    target = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if m is target), None)
    if not isinstance(target, nn.Linear) or name is None:
        raise ExportError(f"timm model {type(model).__name__} has no plain nn.Linear classifier (get_classifier() "
                          f"gives {type(target).__name__}): cannot place the stacked heads in it")
    return name


def _save_for_hf(model: nn.Module, folder: Path, model_args: Mapping[str, Any], data_config: dict[str, Any]) -> None:
    """timm's ``save_for_hf`` (weights and ``config.json``, loadable with ``local-dir:``), with the run's
    preprocessing. timm versions before ``data_config=`` get the architecture arguments and the preprocessing
    written into ``config.json`` directly."""
    from timm.models import save_for_hf

    try:
        save_for_hf(model, str(folder), safe_serialization=True, data_config=data_config)
        return
    except TypeError as exc:
        if "data_config" not in str(exc):
            raise
    save_for_hf(model, str(folder), model_args=dict(model_args), safe_serialization=True)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    pretrained_cfg = config.setdefault("pretrained_cfg", {})
    pretrained_cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()})
    pretrained_cfg.update(num_classes=int(getattr(model, "num_classes", config.get("num_classes", 0))),
                          custom_load=False)
    for key in ("test_input_size", "test_crop_pct", "pool_size", "label_names", "label_descriptions"):
        pretrained_cfg.pop(key, None)
    path.write_text(json.dumps(config, indent=2))


def _save_timm(backbone: TimmBackbone, merged: nn.Module, weight: torch.Tensor, bias: torch.Tensor, folder: Path,
               model_kwargs: Mapping[str, Any], recipe: str) -> dict[str, Any]:
    import timm
    from safetensors.torch import save_file

    kwargs = {k: v for k, v in model_kwargs.items() if k not in _TIMM_LOAD_ONLY}
    kwargs = _json_ready(kwargs, "model.options")
    num_classes = int(weight.shape[0])
    target = timm.create_model(backbone.name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    head = _classifier_name(target)
    state = {k: v.detach().cpu() for k, v in merged.model.state_dict().items()}
    state[f"{head}.weight"], state[f"{head}.bias"] = weight, bias
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"the merged backbone does not fit timm.create_model({backbone.name!r}, num_classes="
                          f"{num_classes}, **{kwargs}): {exc}") from exc
    img_size = int(backbone.img_size or 224)
    try:
        _save_for_hf(target, folder, kwargs, _timm_data_config(recipe, img_size))
    except Exception:  # no huggingface_hub or unserialisable args: the weights alone load the documented way
        save_file({k: v.contiguous() for k, v in target.state_dict().items()}, str(folder / TIMM_WEIGHTS_FILE))
    return {"kind": "timm", "modality": "image", "model_name": backbone.name, "model_kwargs": kwargs,
            "classifier": head, "transforms": {"recipe": recipe, "img_size": img_size},
            "files": {"weights": TIMM_WEIGHTS_FILE}}


def _save_transformers(backbone: HFTextBackbone, merged: nn.Module, weight: torch.Tensor, bias: torch.Tensor,
                       folder: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    merged.model.save_pretrained(str(folder))
    backbone.tokenizer.save_pretrained(str(folder))
    save_file({"weight": weight, "bias": bias}, str(folder / CLASSIFIER_FILE))
    pooling_dir = folder / "1_Pooling"  # the sentence-transformers pooling note, read by inflora.build_backbone
    pooling_dir.mkdir(exist_ok=True)
    (pooling_dir / "config.json").write_text(json.dumps({
        "word_embedding_dimension": backbone.feature_dim, "pooling_mode_cls_token": backbone.pooling == "cls",
        "pooling_mode_mean_tokens": backbone.pooling == "mean"}, indent=2))
    return {"kind": "transformers", "modality": "text", "model_name": backbone.name, "pooling": backbone.pooling,
            "normalize": backbone.normalize, "max_length": backbone.max_length,
            "files": {"classifier": CLASSIFIER_FILE}}


def _probe_inputs(backbone: Backbone) -> Any:
    """A small fixed batch for checking an export against its source."""
    if backbone.modality == "text":
        texts = ["what is my account balance", "set an alarm for seven tomorrow morning, please", "hello"]
        return backbone.collate([(t, 0) for t in texts])[0]
    size = int(backbone.img_size or 224)
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _prepare_target(to_dir: Path, overwrite: bool) -> set[str]:
    """Refuse to write into a folder that holds something, unless ``overwrite`` and it is an earlier export with a
    valid manifest. Returns the files that earlier export wrote (relative paths, its manifest included)."""
    if to_dir.exists() and not to_dir.is_dir():
        raise ExportError(f"--to {to_dir} exists and is not a folder")
    if not (to_dir.is_dir() and any(to_dir.iterdir())):
        return set()
    if not overwrite:
        raise ExportError(f"output folder {to_dir} is not empty (pass --overwrite to replace an earlier export)")
    try:
        manifest = read_manifest(to_dir)
    except ExportError as exc:
        raise ExportError(f"refusing to replace {to_dir}: it holds files but is not an inflora export with a valid "
                          f"manifest ({exc})") from None
    if "sha256" not in manifest:
        raise ExportError(f"refusing to replace {to_dir}: its manifest (format {manifest['format_version']}) does not "
                          "list the files the export wrote; remove the folder yourself or export elsewhere")
    return {MANIFEST_FILE, *manifest["sha256"]}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Files ``0666 & ~umask``, folders ``0777 & ~umask`` (some writers create their files ``0600``)."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _carry_user_files(old: Path, new: Path, owned: set[str]) -> None:
    """Put into ``new`` (hard links, else copies) every entry of ``old`` that the earlier export did not write;
    refuse when the new export would replace one of them."""
    written = {p.relative_to(new).as_posix() for p in new.rglob("*")}
    for dirpath, dirnames, filenames in os.walk(old):
        here = Path(dirpath)
        rel_dir = here.relative_to(old)
        links = [d for d in dirnames if (here / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if d not in links]
        for d in dirnames:
            rel = (rel_dir / d).as_posix()
            if rel in written and not (new / rel).is_dir():
                raise ExportError(f"refusing to replace {old}: the new export would replace the user's folder {rel}")
        for name in [*filenames, *links]:
            rel = (rel_dir / name).as_posix()
            if rel in owned:
                continue
            if rel in written:
                raise ExportError(f"refusing to replace {old}: {rel} is not one of the files its manifest lists, and "
                                  "the new export would replace it; move it away first")
            src, dst = here / name, new / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        for d in dirnames:  # the user's empty folders too
            (new / rel_dir / d).mkdir(parents=True, exist_ok=True)


def export_model(
    backbone: Backbone,
    weight: torch.Tensor,
    bias: torch.Tensor,
    class_names: Sequence[str],
    to_dir: str | os.PathLike[str],
    *,
    recipe: str = "imagenet",
    model_kwargs: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    reference: Callable[[Any], torch.Tensor] | None = None,
    verify: bool = True,
    merged: nn.Module | None = None,
) -> dict[str, Any]:
    """Write ``backbone`` (its adapter branches merged) with the linear classifier ``(weight, bias)`` to ``to_dir``.

    ``recipe``: image transform recipe (timm); ``model_kwargs``: the ``timm.create_model`` arguments the backbone
    was built with; ``info``: extra manifest entries (source run, method, ...). With ``verify`` the written folder is
    reloaded and its logits on a probe batch are compared with ``reference(inputs)`` (default: ``backbone`` then
    the classifier). ``merged``: the plain backbone to write (default: ``backbone`` with its LoRA branches
    folded). Written to a temporary sibling folder, then moved into place. Returns the manifest.
    """
    from ..version import __version__

    to_dir = Path(to_dir)
    _prepare_target(to_dir, overwrite)  # fail early; checked again when the new files are in place
    weight, bias = weight.detach().float().cpu().contiguous(), bias.detach().float().cpu().contiguous()
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[1] != backbone.feature_dim:
        raise ExportError(f"classifier shapes {tuple(weight.shape)}, {tuple(bias.shape)} do not fit feature_dim "
                          f"{backbone.feature_dim}")
    if len(class_names) != weight.shape[0]:
        raise ExportError(f"{len(class_names)} class names for {weight.shape[0]} classifier rows")
    merged = (merged_copy(backbone) if merged is None else merged).cpu()
    to_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = to_dir.parent / f".{to_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o777)
    try:
        if isinstance(backbone, TimmBackbone):
            spec = _save_timm(backbone, merged, weight, bias, tmp, model_kwargs or {}, recipe)
        elif isinstance(backbone, HFTextBackbone):
            spec = _save_transformers(backbone, merged, weight, bias, tmp)
        else:
            raise ExportError(f"cannot export a {type(backbone).__name__}: only timm and transformers backbones")
        manifest = {"format": "inflora-export", "format_version": EXPORT_FORMAT, **spec,
                    "feature_dim": int(backbone.feature_dim), "num_classes": int(weight.shape[0]),
                    **_json_ready(dict(info or {}), "export info"),
                    "files": {**spec["files"], "class_names": CLASS_NAMES_FILE},
                    "library": "inflora", "library_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / CLASS_NAMES_FILE).write_text(json.dumps(list(map(str, class_names)), indent=1, ensure_ascii=False))
        manifest["sha256"] = folder_digests(tmp)  # every file the export wrote, checked on loading
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        _apply_umask(tmp)
        if verify:
            _verify(backbone, weight, bias, tmp, reference)
        owned = _prepare_target(to_dir, overwrite)
        if to_dir.exists():
            _carry_user_files(to_dir, tmp, owned)
            old = to_dir.parent / f".{to_dir.name}.old-{os.getpid()}"
            to_dir.rename(old)
            tmp.rename(to_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(to_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


@torch.no_grad()
def _verify(backbone: Backbone, weight: torch.Tensor, bias: torch.Tensor, folder: Path,
            reference: Callable[[Any], torch.Tensor] | None) -> None:
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        inputs = _probe_inputs(backbone)
        on_device = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs.to(device)
        if reference is None:
            expected = F.linear(_call(backbone, on_device).float(), weight.to(device), bias.to(device))
        else:
            expected = reference(on_device)
        got = ExportedModel.load(folder)(inputs)
    finally:
        backbone.train(was_training)
    diff = float((expected.float().cpu() - got).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if not math.isfinite(diff) or diff > VERIFY_TOLERANCE * scale:
        raise ExportError(f"the exported model's logits differ from the source's by {diff:.3g} (tolerance "
                          f"{VERIFY_TOLERANCE * scale:.3g}): export aborted")

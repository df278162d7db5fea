"""Export a finished run as a merged model, and predict with it (``inflora export`` / ``inflora predict``).

``inflora export RUN_DIR --to MODEL_DIR`` rebuilds the run from ``RUN_DIR/config.yaml``, restores its last
checkpoint, folds every task's low-rank branch into the backbone weights and stacks all task heads (in class order)
into one classifier. ``MODEL_DIR`` then needs neither inflora nor adapters: plain timm / transformers code loads it.

Every export holds ``inflora_export.json`` (the manifest: backbone kind and name, pooling, feature dimension, number
of classes, image recipe and size, source run, library version) and ``class_names.json`` (logit ``i`` is class
``class_names[i]``). Besides, a **timm** export holds ``model.safetensors`` (the timm model's own state dict, the
classifier as its head) and timm's ``config.json``::

    import json, safetensors.torch, timm, torch
    m = json.load(open(f"{d}/inflora_export.json"))
    model = timm.create_model(m["model_name"], pretrained=False, num_classes=m["num_classes"], **m["model_kwargs"])
    model.load_state_dict(safetensors.torch.load_file(f"{d}/model.safetensors"))
    logits = model.eval()(images)        # images: (B, 3, S, S) in [0, 1], no mean/std normalisation
    # or, with a timm that knows "local-dir:": timm.create_model(f"local-dir:{d}", pretrained=True)

Preprocessing is the run's test transform, ``inflora.data.image_transforms(m["transforms"]["recipe"], False,
m["transforms"]["img_size"])``; timm's ``create_transform(**resolve_data_config({}, model=model))`` gives the same
on an RGB image. A **transformers** export holds the merged encoder and its tokenizer (``save_pretrained``) and
``classifier.safetensors`` (``weight`` ``(C, d)``, ``bias`` ``(C,)``)::

    import json, safetensors.torch, torch
    from transformers import AutoModel, AutoTokenizer
    m = json.load(open(f"{d}/inflora_export.json"))
    encoder, tokenizer = AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    head = safetensors.torch.load_file(f"{d}/classifier.safetensors")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=m["max_length"], return_tensors="pt")
    hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    feats = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)   # m["pooling"] == "mean"; "cls": hidden[:, 0]
    # if m["normalize"]: feats = torch.nn.functional.normalize(feats, dim=-1)
    logits = torch.nn.functional.linear(feats, head["weight"], head["bias"])

Layers: :func:`export_model` (a backbone + one linear classifier -> a folder), :func:`export_experiment` (an
in-memory trained :class:`~inflora.engine.Experiment`), :func:`load_trained_experiment` / :func:`export_run` (a
run folder, through ``inflora.checkpoint.restore``), :class:`ExportedModel` (load an export and predict).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapter.layers import LoRALinear
from .backbones import Backbone, HFTextBackbone, TimmBackbone

if TYPE_CHECKING:
    from .engine import Experiment
    from .heads import TaskHeads

__all__ = [
    "CLASSIFIER_FILE",
    "CLASS_NAMES_FILE",
    "MANIFEST_FILE",
    "ExportError",
    "ExportedModel",
    "add_export_commands",
    "concatenated_head",
    "export_experiment",
    "export_model",
    "export_run",
    "load_trained_experiment",
    "merged_copy",
    "read_manifest",
    "restore_last_checkpoint",
]

MANIFEST_FILE = "inflora_export.json"
CLASS_NAMES_FILE = "class_names.json"
CLASSIFIER_FILE = "classifier.safetensors"
TIMM_WEIGHTS_FILE = "model.safetensors"
EXPORT_FORMAT = 1
VERIFY_TOLERANCE = 1e-4
# create_model arguments that only say where weights come from: not part of the architecture
_TIMM_LOAD_ONLY = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                   "cache_dir")


class ExportError(ValueError):
    """A run cannot be exported, or a folder is not a usable export."""


# ------------------------------------------------------------------------------------------------ building blocks
@torch.no_grad()
def merged_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every :class:`LoRALinear` folded (all branches, task order) into a plain
    ``nn.Linear``; frozen, in eval mode. ``module`` itself is left untouched."""
    model = copy.deepcopy(module)
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, layer in wrapped:
        for task in sorted(int(k) for k in layer.branches):
            layer.merge_branch(task)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def concatenated_head(heads: TaskHeads, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (C, d), bias (C,))`` of heads ``0..count-1`` stacked in class order (default: all heads)."""
    count = len(heads) if count is None else count
    if not 1 <= count <= len(heads):
        raise ExportError(f"cannot stack {count} heads: the learner has {len(heads)}")
    chosen = [heads.heads[t] for t in range(count)]
    weight = torch.cat([h.weight.detach() for h in chosen]).float().cpu().contiguous()
    bias = torch.cat([h.bias.detach() for h in chosen]).float().cpu().contiguous()
    return weight, bias


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


def _prepare_target(to_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that holds something, unless ``overwrite`` and it is an earlier export."""
    if to_dir.exists() and not to_dir.is_dir():
        raise ExportError(f"--to {to_dir} exists and is not a folder")
    if to_dir.is_dir() and any(to_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"output folder {to_dir} is not empty (pass --overwrite to replace an earlier export)")
        if not (to_dir / MANIFEST_FILE).is_file():
            raise ExportError(f"refusing to replace {to_dir}: it holds files but is not an inflora export")


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
) -> dict[str, Any]:
    """Write ``backbone`` (its adapter branches merged) with the linear classifier ``(weight, bias)`` to ``to_dir``.

    ``recipe``: image transform recipe (timm); ``model_kwargs``: the ``timm.create_model`` arguments the backbone
    was built with; ``info``: extra manifest entries (source run, method, ...). With ``verify`` the written folder is
    reloaded and its logits on a probe batch are compared with ``reference(inputs)`` (default: ``backbone`` then
    the classifier). Written to a temporary sibling folder, then moved into place. Returns the manifest.
    """
    from . import __version__

    to_dir = Path(to_dir)
    _prepare_target(to_dir, overwrite)
    weight, bias = weight.detach().float().cpu().contiguous(), bias.detach().float().cpu().contiguous()
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[1] != backbone.feature_dim:
        raise ExportError(f"classifier shapes {tuple(weight.shape)}, {tuple(bias.shape)} do not fit feature_dim "
                          f"{backbone.feature_dim}")
    if len(class_names) != weight.shape[0]:
        raise ExportError(f"{len(class_names)} class names for {weight.shape[0]} classifier rows")
    merged = merged_copy(backbone).cpu()
    to_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = to_dir.parent / f".{to_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        if verify:
            _verify(backbone, weight, bias, tmp, reference)
        if to_dir.exists():
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


# ------------------------------------------------------------------------------------------------ experiments, runs
def export_experiment(
    experiment: Experiment,
    to_dir: str | os.PathLike[str],
    *,
    source_run: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Export a trained, in-memory experiment: all finished tasks' heads over the merged backbone.

    The exported logits are those of ``experiment.learner.logits`` after the last finished task (checked on a probe
    batch with ``verify``). The experiment is left as it was. Returns the manifest.
    """
    learner, config = experiment.learner, experiment.config
    adapter = getattr(learner, "adapter", None)
    if adapter is not None and getattr(adapter, "in_task", False):
        raise ExportError("the learner is in the middle of a task: export after the task has ended")
    done = int(experiment.state.tasks_done)
    if done < 1:
        raise ExportError("the run has no finished task: nothing to export")
    count = 1 if learner.shared_head else done
    weight, bias = concatenated_head(learner.heads, count)
    order = [experiment.dataset.class_names[c] for c in experiment.scenario.class_order]
    if len(order) < weight.shape[0]:
        raise ExportError(f"the heads cover {weight.shape[0]} classes but the scenario has {len(order)}")
    upto = done - 1

    def reference(inputs: Any) -> torch.Tensor:
        return learner.logits(learner.features(inputs).float(), upto)

    info = {"backbone": config.model.backbone, "source_run": str(Path(source_run).resolve()) if source_run else None,
            "method": config.method, "benchmark": config.benchmark, "dataset": config.data.name,
            "seed": config.seed, "tasks_done": done, "num_tasks": experiment.num_tasks,
            "classes_per_task": learner.heads.sizes[:count], "scenario": experiment.scenario.kind}
    return export_model(learner.backbone, weight, bias, order[: weight.shape[0]], to_dir,
                        recipe=config.data.transforms, model_kwargs=config.model.options, info=info,
                        overwrite=overwrite, reference=reference, verify=verify)


def load_trained_experiment(run_dir: str | os.PathLike[str], device: str = "cpu") -> Experiment:
    """Rebuild the experiment of ``run_dir`` (``config.yaml``) on ``device`` and restore its last checkpoint
    (heads, adapter state, class statistics, run state) with :func:`restore_last_checkpoint`."""
    import yaml

    from .config import ConfigError, from_dict
    from .engine import Experiment

    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"run folder not found: {run}")
    config_file = run / "config.yaml"
    if not config_file.is_file():
        seeds = sorted(p.name for p in run.glob("seed_*") if (p / "config.yaml").is_file())
        if seeds:
            raise ExportError(f"{run} holds several seeds: export one of them, e.g. {run / seeds[0]}")
        raise ExportError(f"{run} is not a run folder (no config.yaml)")
    try:
        config = from_dict(yaml.safe_load(config_file.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as exc:
        raise ExportError(f"{config_file}: {exc}") from exc
    config.train.device = device
    config.train.progress = False
    experiment = Experiment(config, progress=False)
    if not restore_last_checkpoint(experiment, run):
        raise ExportError(f"{run} has no checkpoint: it finished no task, or was run without checkpoints")
    return experiment


def restore_last_checkpoint(experiment: Experiment, run_dir: Path) -> bool:
    """Load the last checkpoint of ``run_dir`` into the fresh ``experiment``; ``False`` when there is none.

    The only contact with :mod:`inflora.checkpoint`: ``load_latest(out) -> Checkpoint | None`` then
    ``restore(experiment, checkpoint)``; or, where there is no ``load_latest``, ``restore(experiment, out) -> bool``.
    """
    import importlib

    try:
        checkpoint = importlib.import_module("inflora.checkpoint")
    except ImportError as exc:
        raise ExportError("this version of inflora cannot read run checkpoints (no inflora.checkpoint)") from exc
    load_latest = getattr(checkpoint, "load_latest", None)
    if load_latest is None:
        return bool(checkpoint.restore(experiment, run_dir))
    found = load_latest(run_dir)
    if found is None:
        return False
    checkpoint.restore(experiment, found)
    return True


def export_run(run_dir: str | os.PathLike[str], to_dir: str | os.PathLike[str], *, device: str = "cpu",
               overwrite: bool = False, verify: bool = True) -> dict[str, Any]:
    """:func:`load_trained_experiment` then :func:`export_experiment`. Returns the manifest."""
    _prepare_target(Path(to_dir), overwrite)  # fail before the (slow) rebuild
    experiment = load_trained_experiment(run_dir, device)
    return export_experiment(experiment, to_dir, source_run=run_dir, overwrite=overwrite, verify=verify)


# ------------------------------------------------------------------------------------------------ loading, predicting
def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an export folder, with clear errors for a missing folder or a folder that is no export."""
    folder = Path(model_dir)
    if not folder.exists():
        raise ExportError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ExportError(f"{folder} is not an inflora export (no {MANIFEST_FILE}); make one with "
                          "`inflora export RUN_DIR --to MODEL_DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "inflora-export":
        raise ExportError(f"{path} is not an inflora export manifest")
    if manifest.get("format_version") != EXPORT_FORMAT or manifest.get("kind") not in ("timm", "transformers"):
        raise ExportError(f"{path}: export format {manifest.get('format_version')} / kind {manifest.get('kind')!r} "
                          f"is not supported (expected format {EXPORT_FORMAT}, timm or transformers)")
    return manifest


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
            from .data import image_transforms

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
        from safetensors.torch import load_file

        folder = Path(model_dir)
        manifest = read_manifest(folder)
        try:
            class_names = json.loads((folder / CLASS_NAMES_FILE).read_text())
            if manifest["kind"] == "timm":
                import timm

                model = timm.create_model(manifest["model_name"], pretrained=False,
                                          num_classes=manifest["num_classes"], **manifest["model_kwargs"])
                model.load_state_dict(load_file(str(folder / TIMM_WEIGHTS_FILE)))
                out = cls(manifest, class_names, model)
            else:
                from transformers import AutoModel, AutoTokenizer

                encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                head = load_file(str(folder / CLASSIFIER_FILE))
                classifier = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
                classifier.load_state_dict(head)
                out = cls(manifest, class_names, encoder, classifier, tokenizer)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
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


# ------------------------------------------------------------------------------------------------ command line
def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_predictions(inputs: Sequence[str], predictions: Sequence[Sequence[tuple[int, str, float]]]) -> str:
    """A readable table: one block of rows per input (rank, class, probability)."""
    shown = [_shorten(s, 48) for s in inputs]
    width_in = max([5, *map(len, shown)])
    width_cls = max([5, *(len(name) for preds in predictions for _, name, _ in preds)])
    lines = [f"{'input':<{width_in}}  rank  {'class':<{width_cls}}  score", f"{'-' * width_in}  ----  "
             f"{'-' * width_cls}  ------"]
    for text, preds in zip(shown, predictions, strict=True):
        for rank, (_, name, score) in enumerate(preds, 1):
            lines.append(f"{text if rank == 1 else '':<{width_in}}  {rank:>4}  {name:<{width_cls}}  {score:.4f}")
    return "\n".join(lines)


def _quiet_loading() -> None:
    """No per-file progress bars from transformers while loading / saving (command line output stays readable)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def cmd_export(args: argparse.Namespace) -> int:
    _quiet_loading()
    manifest = export_run(args.run_dir, args.to, device=args.device, overwrite=args.overwrite,
                          verify=not args.no_verify)
    print(f"exported {manifest['kind']} model {manifest['model_name']} with {manifest['num_classes']} classes "
          f"({manifest['tasks_done']} tasks) to {args.to}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ExportError(f"--batch-size must be at least 1, got {args.batch_size}")
    _quiet_loading()
    model = ExportedModel.load(args.model_dir, device=args.device)
    inputs: list[str] = []
    for item in args.inputs:
        if item == "-":
            inputs.extend(line.rstrip("\n") for line in sys.stdin if line.strip())
        else:
            inputs.append(item)
    if not inputs:
        raise ExportError("no inputs to predict (stdin gave no non-empty line)")
    predictions = model.predict(inputs, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        rows = [{"input": text, "predictions": [{"class": name, "index": i, "score": score}
                                                for i, name, score in preds]}
                for text, preds in zip(inputs, predictions, strict=True)]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(format_predictions(inputs, predictions))
    return 0


def add_export_commands(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` and ``predict`` subcommands."""
    exp = sub.add_parser("export", help="export a finished run as a merged timm / transformers model",
                         description="Merge all task branches into the backbone, stack all task heads into one "
                                     "classifier and save them for plain timm / transformers (see docs/export.md).")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder (holds config.yaml, checkpoints)")
    exp.add_argument("--to", required=True, metavar="MODEL_DIR", help="folder to write the model to")
    exp.add_argument("--overwrite", action="store_true", help="replace an earlier export in MODEL_DIR")
    exp.add_argument("--device", default="cpu", help="device to rebuild the run on (default: cpu)")
    exp.add_argument("--no-verify", action="store_true", help="skip reloading the export to compare its logits")
    exp.set_defaults(func=cmd_export)

    pred = sub.add_parser("predict", help="top-k classes of images or texts with an exported model",
                          description="Image models read file paths; text models read the arguments as texts "
                                      "(`-` reads one input per line from stdin).")
    pred.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `inflora export`")
    pred.add_argument("inputs", nargs="+", metavar="INPUTS", help="image files or texts; `-` reads lines from stdin")
    pred.add_argument("--top-k", type=int, default=5, help="classes shown per input (default 5)")
    pred.add_argument("--json", action="store_true", help="machine-readable output")
    pred.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass")
    pred.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    pred.set_defaults(func=cmd_predict)

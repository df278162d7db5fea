"""Export a finished run as a merged model, and predict with it (``inflora export`` / ``inflora predict``).

``inflora export RUN_DIR --to MODEL_DIR`` rebuilds the run from ``RUN_DIR/config.yaml``, restores its last
checkpoint, folds every task's low-rank branch into the backbone weights and stacks all task heads (in class order)
into one classifier. ``MODEL_DIR`` then needs neither inflora nor adapters: plain timm / transformers code loads it.

Every export holds ``inflora_export.json`` (the manifest: backbone kind and name, pooling, feature dimension, number
of classes, image recipe and size, source run, library version, and the SHA-256 of every file the export wrote,
checked on loading) and ``class_names.json`` (logit ``i`` is class
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

Rooms: :mod:`.format` (file names, manifest), :mod:`.writers` (:func:`export_model`: a backbone + one linear
classifier -> a folder, per backbone kind), :mod:`.runs` (:func:`export_experiment` from a trained
:class:`~inflora.engine.Experiment` through ``Learner.export_parts``; :func:`load_trained_experiment` /
:func:`export_run` from a run folder), :mod:`.loaded` (:class:`ExportedModel`: load an export and predict),
:mod:`.cli` (the commands).
"""

from ..lora import merged_copy
from .cli import add_export_commands, cmd_export, cmd_predict, format_predictions
from .format import (
    CLASS_NAMES_FILE,
    CLASSIFIER_FILE,
    EXPORT_FORMAT,
    MANIFEST_FILE,
    TIMM_WEIGHTS_FILE,
    VERIFY_TOLERANCE,
    ExportError,
    read_manifest,
)
from .loaded import ExportedModel
from .runs import export_experiment, export_run, load_trained_experiment
from .writers import export_model

__all__ = [
    "CLASSIFIER_FILE",
    "CLASS_NAMES_FILE",
    "EXPORT_FORMAT",
    "MANIFEST_FILE",
    "TIMM_WEIGHTS_FILE",
    "VERIFY_TOLERANCE",
    "ExportError",
    "ExportedModel",
    "add_export_commands",
    "cmd_export",
    "cmd_predict",
    "export_experiment",
    "export_model",
    "export_run",
    "format_predictions",
    "load_trained_experiment",
    "merged_copy",
    "read_manifest",
]

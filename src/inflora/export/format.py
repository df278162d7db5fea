"""The export format: file names, the manifest, and its reader."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST_FILE = "inflora_export.json"
CLASS_NAMES_FILE = "class_names.json"
CLASSIFIER_FILE = "classifier.safetensors"
TIMM_WEIGHTS_FILE = "model.safetensors"
EXPORT_FORMAT = 1
VERIFY_TOLERANCE = 1e-4
# create_model arguments that only say where weights come from: not part of the architecture
_TIMM_LOAD_ONLY = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                   "cache_dir", "fresh_final_norm")  # the fresh norm's weights are in the exported state dict


class ExportError(ValueError):
    """A run cannot be exported, or a folder is not a usable export."""



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

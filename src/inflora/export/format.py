"""The export format: file names, the manifest, and its reader."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_FILE = "inflora_export.json"
CLASS_NAMES_FILE = "class_names.json"
CLASSIFIER_FILE = "classifier.safetensors"
TIMM_WEIGHTS_FILE = "model.safetensors"
EXPORT_FORMAT = 2  # 2: the manifest lists every file the export wrote with its SHA-256 ("sha256")
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
    if manifest.get("format_version") not in (1, EXPORT_FORMAT) or manifest.get("kind") not in ("timm",
                                                                                                 "transformers"):
        raise ExportError(f"{path}: export format {manifest.get('format_version')} / kind {manifest.get('kind')!r} "
                          f"is not supported (expected format {EXPORT_FORMAT}, timm or transformers)")
    if manifest["format_version"] >= 2:
        digests = manifest.get("sha256")
        if not isinstance(digests, dict) or not all(isinstance(k, str) and isinstance(v, str) and _safe(k)
                                                    for k, v in digests.items()):
            raise ExportError(f"{path}: the manifest's file list (sha256) is missing or malformed")
    return manifest


def _safe(relative: str) -> bool:
    """A plain relative path inside the export folder (no absolute path, no ``..``, not the manifest)."""
    parts = Path(relative).parts
    return bool(parts) and not Path(relative).is_absolute() and ".." not in parts and relative != MANIFEST_FILE


def file_digest(path: Path) -> str:
    """SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file under ``folder`` but the manifest, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE)
    return {p.relative_to(folder).as_posix(): file_digest(p) for p in files}


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its recorded SHA-256 (manifests before format 2 list none)."""
    for relative, expected in manifest.get("sha256", {}).items():
        path = folder / relative
        if not path.is_file():
            raise ExportError(f"{path}: missing from the export (its manifest lists it)")
        if file_digest(path) != expected:
            raise ExportError(f"{path}: damaged file (its SHA-256 checksum differs from the manifest's); export "
                              "the run again")

"""Typed run configuration: dataclasses with help text, YAML presets, ``key=value`` overrides.

Every field carries its help in ``metadata["help"]``; ``inflora run --help-config`` prints them. A preset is a YAML
file holding a partial configuration; overrides use dotted keys (``train.epochs=3``, ``method=seqlora``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class DataConfig:
    """Where the data comes from."""

    name: str = opt("clinc150", "dataset registry name (see `inflora datasets`)")
    data_dir: str | None = opt(None, "data directory (default: $INFLORA_DATA, else the user cache folder)")
    options: dict[str, Any] = opt({}, "dataset-specific options, e.g. {train: my.csv, test: my_test.csv}")
    transforms: Literal["cifar", "imagenet"] = opt("imagenet", "image transform recipe of the method spec")


@dataclass
class ScenarioConfig:
    """How the data is cut into tasks."""

    kind: Literal["class", "domain"] = opt("class", "class-incremental or domain-incremental")
    num_tasks: int = opt(10, "number of tasks T (class-incremental)")
    classes_per_task: int | None = opt(None, "use only num_tasks x classes_per_task classes (default: all)")
    order: Literal["natural", "shuffled", "groups"] = opt("natural", "class order: natural, seeded shuffle, "
                                                                      "or the dataset's class groups")
    order_seed: int | None = opt(None, "seed of the shuffled class order (default: the run seed)")
    domains: list[str] | None = opt(None, "domain order (domain-incremental; default: the dataset's)")
    max_train_per_class: int | None = opt(None, "keep at most this many training samples per class")
    max_test_per_class: int | None = opt(None, "keep at most this many test samples per class")
    eval_split: Literal["test", "val"] = opt("test", "split evaluated after each task (val: for tuning)")


@dataclass
class ModelConfig:
    """The pre-trained backbone."""

    backbone: str = opt("all-MiniLM-L6-v2", "timm:<name[.tag]>, hf:<hub id or path>, a local path, or "
                                            "all-MiniLM-L6-v2")
    pretrained: bool = opt(True, "load pre-trained weights (timm)")
    checkpoint: str | None = opt(None, "local weights file for a timm backbone")
    max_length: int = opt(64, "text: maximum tokens per input")
    options: dict[str, Any] = opt({}, "extra backbone arguments, e.g. {img_size: 32, patch_size: 8} for timm")


@dataclass
class AdapterConfig:
    """InfLoRA / LoRA adapter settings (see InfLoRAConfig)."""

    preset: str | None = opt(None, "layer preset (default: the backbone's, timm-vit-kv or bert-kv)")
    targets: str | None = opt(None, "regex of nn.Linear names to adapt instead of a preset")
    blocks: int | None = opt(None, "adapt only the first N blocks (the paper's b5: 5)")
    rank: int = opt(10, "rank r of each task's branch")
    lamb: float = opt(0.95, "memory threshold at the first task")
    lame: float = opt(1.0, "memory threshold the schedule moves towards")
    memory: Literal["dualgpm", "gpm"] = opt("dualgpm", "DualGPM or plain GPM")
    energy: Literal["faithful", "gpm"] = opt("faithful", "energy rule: faithful (S**2 of C) or gpm")
    projection: Literal["one-sided", "two-sided"] = opt("one-sided", "old-space removal before the SVD")
    design: Literal["inflora", "random", "new-task", "complement"] = opt("inflora", "down-projection design")
    stats_samples: int | None = opt(None, "samples per task in each statistics pass (None: all)")


@dataclass
class TrainConfig:
    """Optimisation."""

    epochs: int = opt(2, "epochs per task")
    loss: Literal["local", "seen"] = opt("local", "cross-entropy over the current head only (local, the reference) "
                                                  "or over all seen classes' logits with old heads frozen (seen)")
    batch_size: int = opt(32, "training batch size (global, over all ranks)")
    eval_batch_size: int = opt(128, "evaluation / statistics batch size")
    optimizer: Literal["adam", "sgd"] = opt("adam", "optimiser")
    lr: float = opt(5e-4, "learning rate of the adapter (and of the heads unless head_lr is set)")
    head_lr: float | None = opt(None, "learning rate of the heads (default: lr)")
    weight_decay: float = opt(0.0, "weight decay")
    momentum: float = opt(0.9, "SGD momentum")
    schedule: Literal["reference-cosine", "cosine", "step", "constant"] = opt(
        "reference-cosine", "per-epoch schedule: the reference's lr0*cos(99*pi*e/(200*(E-1))), cosine, step, constant")
    milestones: list[int] = opt([], "step schedule: epochs where lr is multiplied by gamma")
    gamma: float = opt(0.1, "step schedule factor")
    amp: bool = opt(True, "automatic mixed precision (bfloat16) on GPU")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    num_workers: int = opt(0, "data loader worker processes")
    progress: bool = opt(True, "progress bars")


@dataclass
class AlignmentConfig:
    """Classifier alignment (+CA): heads re-aligned on samples from stored class feature Gaussians."""

    enabled: bool = opt(False, "align the heads after each task (no input is kept: only means and covariances)")
    epochs: int = opt(5, "alignment epochs")
    lr: float = opt(0.01, "alignment SGD learning rate (cosine schedule)")
    momentum: float = opt(0.9, "alignment SGD momentum")
    weight_decay: float = opt(5e-4, "alignment weight decay")
    samples_per_class: int = opt(256, "samples drawn per seen class each epoch")
    batch_size: int = opt(128, "alignment batch size")
    shrink: float = opt(1e-4, "added to the covariance diagonal")
    logit_norm: float | None = opt(None, "logit normalisation temperature (0.1 on ImageNet-R; None: off)")


@dataclass
class RunConfig:
    """A whole continual-learning run."""

    benchmark: str = opt("custom", "name of the benchmark setting (presets set it)")
    description: str = opt("", "one line describing the setting")
    method: str = opt("inflora", "learner: inflora, seqlora, joint, frozen")
    seed: int = opt(0, "random seed")
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)


class ConfigError(ValueError):
    """A configuration key or value that is not valid."""


# ------------------------------------------------------------------------------------------------ coercion
def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [v for v in str(value).split(",") if v.strip()] if isinstance(value, str) else [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(yaml.safe_load(v) if isinstance(v, str) and item is not str else v, item, key)
                for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_mapping(config: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    """Set fields of the dataclass ``config`` from a nested mapping, validating keys and types."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {mapping!r}")
    hints = _hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {full!r}; valid keys here: {', '.join(prefix + n for n in names)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            apply_mapping(current, value, prefix=f"{full}.")
        else:
            setattr(config, key, _check_type(value, hints[key], full))


def set_override(config: RunConfig, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: dict[str, Any] = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    apply_mapping(config, node)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(mapping: dict[str, Any]) -> RunConfig:
    config = RunConfig()
    apply_mapping(config, mapping)
    return config


# ------------------------------------------------------------------------------------------------ presets
def _preset_files() -> dict[str, Any]:
    folder = resources.files("inflora") / "presets"
    return {p.name[: -len(".yaml")]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> dict[str, str]:
    """``{preset name: one-line description}``, sorted by name."""
    out = {}
    for name, path in sorted(_preset_files().items()):
        data = yaml.safe_load(path.read_text()) or {}
        out[name] = str(data.get("description", ""))
    return out


def load_config(preset_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve a run configuration: defaults, then a preset name or YAML file, then ``key=value`` overrides.

    ``None`` gives the default offline benchmark (preset ``clinc150``).
    """
    source = preset_or_path or "clinc150"
    presets = _preset_files()
    if source in presets:
        text = presets[source].read_text()
    elif Path(source).is_file():
        text = Path(source).read_text()
    else:
        raise ConfigError(f"unknown preset or file {source!r}; presets: {', '.join(sorted(presets))}")
    try:
        mapping = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    config = from_dict(mapping)
    for assignment in overrides:
        set_override(config, assignment)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Checks that span several fields."""
    from .learners import LEARNERS

    if config.method not in LEARNERS:
        raise ConfigError(f"method: {config.method!r} is not one of {', '.join(sorted(LEARNERS))}")
    positive = {"scenario.num_tasks": config.scenario.num_tasks, "train.epochs": config.train.epochs,
                "train.batch_size": config.train.batch_size, "train.eval_batch_size": config.train.eval_batch_size,
                "adapter.rank": config.adapter.rank}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if config.train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {config.train.lr}")
    if not (0 < config.adapter.lamb <= 1 and 0 < config.adapter.lame <= 1):
        raise ConfigError("adapter.lamb and adapter.lame must lie in (0, 1]")


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every configuration field, for ``--help-config``."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_fields(type(value), prefix=f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows

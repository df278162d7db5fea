"""Typed run configuration: dataclasses with help text, YAML presets, ``key=value`` overrides.

Every field carries its help in ``metadata["help"]``; ``inflora run --help-config`` prints them. A preset is a YAML
file holding a partial configuration; overrides use dotted keys (``train.epochs=3``, ``method=seqlora``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

SECTIONS: dict[str, tuple[str, type]] = {}
"""Option sections: name -> (kind, dataclass type). Filled by the package's method and classifier registries."""
CHOICES: dict[str, set[str]] = {"method": set(), "classifier": set()}
"""Valid values of ``method`` and ``classifier`` (filled by the same registries)."""
OWN_CLASSIFIER: dict[str, str | None] = {}
"""The classifier a method *is*, if any (``simplecil`` -> ``prototype``): its runs use it whatever a preset says."""


def register_choice(kind: str, name: str, options: type | None, classifier: str | None = None) -> None:
    """Declare a ``method`` or ``classifier`` value, its option section (a dataclass built with :func:`opt` fields,
    or ``None``) and, for a method that is a classifier, that classifier. Called by the learner and classifier
    registries; this module imports nothing else of the package."""
    if kind not in CHOICES:
        raise ValueError(f"kind must be one of {sorted(CHOICES)}, got {kind!r}")
    if options is not None:
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"options of {kind} {name!r} must be a dataclass, got {options!r}")
        owner = SECTIONS.get(name)
        if owner is not None and owner != (kind, options):
            raise ValueError(f"option section {name!r} is already registered by {owner[0]} {name!r}")
        SECTIONS[name] = (kind, options)
    CHOICES[kind].add(name)
    if kind == "method":
        OWN_CLASSIFIER[name] = classifier


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
    cipher: int | list[int | Literal["plain"]] | None = opt(None, "text: letter-substitution cipher seed of every "
        "text, or a list of seeds and 'plain', one domain each (docs/benchmarks-cipher.md)")


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
class TrainConfig:
    """Optimisation."""

    epochs: int = opt(2, "epochs per task")
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
    amp: bool | Literal["always"] = opt(True, "bfloat16 autocast: true on GPU, always: CPU too (docs/precision.md)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    num_workers: int = opt(0, "data loader worker processes")
    progress: bool = opt(True, "progress bars")


@dataclass
class LoggingConfig:
    """What a run logs besides results.json and run.log (never changes results)."""

    tensorboard: bool = opt(False, "TensorBoard event files of per-step losses and per-task metrics in OUT/tensorboard")


@dataclass
class EvaluationConfig:
    """What the evaluation pass after each task measures besides accuracy."""

    probe_samples: int = opt(64, "evaluation samples per task (fixed, seeded) whose features are kept when the task is "
                                 "learnt, to report their relative drift after later tasks (0: off)")


@dataclass
class RunConfig:
    """A whole continual-learning run. Besides these fields, the chosen method's and classifier's option sections
    (e.g. ``inflora:``, ``aligned:``) live in ``sections``; read them with :meth:`options`."""

    benchmark: str = opt("custom", "name of the benchmark setting (presets set it)")
    description: str = opt("", "one line describing the setting")
    method: str = opt("inflora", "learner (see `inflora methods`); its options are the section of the same name")
    classifier: str = opt("linear", "classifier component: linear (per-task heads), aligned (+CA), ...; its options "
                                    "are the section of the same name")
    seed: int = opt(0, "random seed")
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False,
                                                metadata={"help": "option sections", "internal": True})
    cli_sections: set[str] = field(default_factory=set, repr=False, compare=False,
                                   metadata={"help": "sections set on the command line", "internal": True})

    def options(self, section: str) -> Any:
        """The typed options of ``section`` (a registered method or classifier): defaults plus what was set."""
        if section not in SECTIONS:
            raise ConfigError(f"no option section {section!r}; sections: {', '.join(sorted(SECTIONS)) or '(none)'}")
        _, cls = SECTIONS[section]
        instance = cls()
        apply_mapping(instance, self.sections.get(section, {}), prefix=f"{section}.")
        return instance

    @property
    def method_options(self) -> Any:
        """The chosen method's typed options (``None`` for a method without options)."""
        return self.options(self.method) if self.method in SECTIONS else None

    @property
    def classifier_options(self) -> Any:
        return self.options(self.classifier) if self.classifier in SECTIONS else None


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
                first = isinstance(value, list) and typing.get_origin(arg) is list  # a list's own error first
                errors.insert(0 if first else len(errors), str(exc))
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


def apply_mapping(config: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    """Set fields of the dataclass ``config`` from a nested mapping, validating keys and types. On a
    :class:`RunConfig`, a top-level key naming a registered method or classifier holds that option section."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config) if not f.metadata.get("internal")]
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(config, RunConfig) and key in SECTIONS:
            _set_section(config, key, value)
            continue
        if key not in names:
            extra = f"; option sections: {', '.join(sorted(SECTIONS))}" if isinstance(config, RunConfig) else ""
            raise ConfigError(f"unknown key {full!r}; valid keys here: {', '.join(prefix + n for n in names)}{extra}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            apply_mapping(current, value, prefix=f"{full}.")
        else:
            setattr(config, key, _check_type(value, hints[key], full))


def _set_section(config: RunConfig, section: str, mapping: Any) -> None:
    """Merge ``mapping`` into option section ``section``, checked against its typed options now."""
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, dict):
        raise ConfigError(f"{section}: expected a mapping of options, got {mapping!r}")
    merged = {**config.sections.get(section, {}), **mapping}
    _, cls = SECTIONS[section]
    probe = cls()
    apply_mapping(probe, merged, prefix=f"{section}.")  # unknown keys and bad types fail here, naming valid keys
    config.sections[section] = {k: getattr(probe, k) for k in merged}


def set_override(config: RunConfig, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``).
    Sections set here must belong to the chosen method or classifier (checked by :func:`validate`)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({exc})") from None
    node: dict[str, Any] = {}
    cursor = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    if parts[0] in SECTIONS:
        config.cli_sections.add(parts[0])
    apply_mapping(config, node)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data of a config. A :class:`RunConfig` gives its fields plus the resolved option sections of the
    chosen method and classifier (all their options, defaults included); other sections are left out."""
    if not isinstance(config, RunConfig):
        return dataclasses.asdict(config)
    out = {f.name: dataclasses.asdict(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else v
           for f in dataclasses.fields(config) if not f.metadata.get("internal")}
    for section in (config.method, config.classifier):
        if section in SECTIONS:
            out[section] = dataclasses.asdict(config.options(section))
    return out


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
    own = OWN_CLASSIFIER.get(config.method)
    if own and config.classifier != own:  # a method that is a classifier replaces a preset's, refuses another one
        if any(a.split("=", 1)[0].strip() == "classifier" for a in overrides):
            raise ConfigError(f"method {config.method!r} is the classifier {own!r}: it cannot run with classifier "
                              f"{config.classifier!r} (drop that override)")
        config.classifier = own
    if config.model.options.get("trust_remote_code") and not _cli_trusts_remote_code(overrides):
        raise ConfigError(f"{source} sets model.options.trust_remote_code, which runs the model folder's Python code: "
                          "refused from a preset or file; if you trust that code, pass it on the command line "
                          "(--set 'model.options={trust_remote_code: true, ...}')")
    validate(config)
    return config


def _cli_trusts_remote_code(overrides: list[str] | tuple[str, ...]) -> bool:
    """Whether the ``key=value`` overrides themselves set ``model.options`` with ``trust_remote_code``."""
    probe = RunConfig()
    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if key in ("model", "model.options") or key.startswith("model.options."):
            set_override(probe, assignment)
    return bool(probe.model.options.get("trust_remote_code"))


def validate(config: RunConfig) -> None:
    """Checks that span several fields; the chosen method's and classifier's own ``validate()``."""
    for kind, name in (("method", config.method), ("classifier", config.classifier)):
        if name not in CHOICES[kind]:
            valid = ", ".join(sorted(CHOICES[kind])) or "(none registered)"
            raise ConfigError(f"{kind}: {name!r} is not one of {valid}")
    if OWN_CLASSIFIER.get(config.method) not in (None, config.classifier):
        raise ConfigError(f"method {config.method!r} is the classifier {OWN_CLASSIFIER[config.method]!r}, not "
                          f"{config.classifier!r}")
    chosen = {config.method, config.classifier}
    stray = sorted(s for s in config.cli_sections if s not in chosen)
    if stray:
        valid = [f"{s}.{f.name}" for s in sorted(chosen) if s in SECTIONS for f in dataclasses.fields(SECTIONS[s][1])]
        raise ConfigError(f"option section(s) {', '.join(stray)} do not belong to method {config.method!r} or "
                          f"classifier {config.classifier!r}; their options: {', '.join(valid) or '(none)'}")
    positive = {"scenario.num_tasks": config.scenario.num_tasks, "train.epochs": config.train.epochs,
                "train.batch_size": config.train.batch_size, "train.eval_batch_size": config.train.eval_batch_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if config.evaluation.probe_samples < 0:
        raise ConfigError(f"evaluation.probe_samples must be >= 0 (0: off), got {config.evaluation.probe_samples}")
    if not (config.train.lr > 0 and math.isfinite(config.train.lr)):
        raise ConfigError(f"train.lr must be a finite number > 0, got {config.train.lr}")
    if config.train.head_lr is not None and not (config.train.head_lr > 0 and math.isfinite(config.train.head_lr)):
        raise ConfigError(f"train.head_lr must be a finite number > 0, got {config.train.head_lr}")
    for section in sorted(chosen & set(SECTIONS)):
        check = getattr(config.options(section), "validate", None)
        if check is not None:
            try:
                check()
            except ValueError as exc:
                raise ConfigError(f"{section}: {exc}") from None


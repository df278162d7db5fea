"""The methods a comparison runs: named variants of a preset, parsed from ``--methods`` and resolved to configs.

``--methods`` is a comma-separated list of ``[LABEL=]METHOD[KEY=VALUE,...]``::

    inflora,seqlora,frozen                        three methods, labelled by name
    inflora,inflora[classifier=aligned]           InfLoRA twice; the second labelled inflora_classifier=aligned
    ca=inflora[classifier=aligned,aligned.epochs=5],frozen[classifier=aligned]

Commas inside brackets (or inside a YAML value such as ``[1, 2]``) do not split. Or the path of a YAML file (``.yaml``
/ ``.yml``) holding a mapping ``label: {key: value, ...}`` (the variant's method is its ``method`` key, else its
label) or a list of the strings above. A label names the variant's folder: letters, digits and ``._=+-``.

Options set with ``--set`` apply to every variant, except those of an option section (``inflora.rank=8``), which
apply to the variants whose method or classifier owns that section (a section no variant owns is an error). The
variant's own options come last and win.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import SECTIONS, ConfigError, RunConfig, load_config

LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,99}")
RESERVED = frozenset({"logs", "figures", "tensorboard", "checkpoints"})
"""Names of folders a comparison (or a run) writes itself: never a label."""
SPEC = re.compile(r"\s*(?:(?P<label>[^=\[\],]+?)\s*=\s*)?(?P<method>[A-Za-z0-9_][A-Za-z0-9_.-]*)\s*"
                  r"(?:\[(?P<options>.*)\])?\s*", re.DOTALL)


@dataclass(frozen=True)
class Variant:
    """One compared method: its label (folder name), its method and its own ``key=value`` overrides."""

    label: str
    method: str
    overrides: tuple[str, ...] = ()

    def all_overrides(self) -> list[str]:
        """``method=...`` and the variant's own options, as ``inflora run --set`` takes them."""
        return [f"method={self.method}", *self.overrides]


def split_top(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets and braces (empty parts dropped); unbalanced brackets fail."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"--methods: unbalanced brackets in {text!r}")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ConfigError(f"--methods: unbalanced brackets in {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9._=+-]", "-", text)).strip("-")


def check_label(label: str, where: str) -> str:
    if not LABEL.fullmatch(label) or label in RESERVED:
        raise ConfigError(f"{where}: label {label!r} cannot name a folder: use 1-100 letters, digits and ._=+- "
                          f"(starting with a letter or digit), not {', '.join(sorted(RESERVED))}; give one "
                          "explicitly as LABEL=METHOD[...]")
    return label


def parse_spec(text: str) -> Variant:
    """One ``[LABEL=]METHOD[KEY=VALUE,...]``."""
    match = SPEC.fullmatch(text)
    if match is None:
        raise ConfigError(f"--methods: {text!r} is not [LABEL=]METHOD[KEY=VALUE,...], e.g. inflora[classifier=aligned]")
    method, options = match["method"], split_top(match["options"] or "")
    for option in options:
        if "=" not in option:
            raise ConfigError(f"--methods: option {option!r} of {text!r} must look like key=value")
        if option.split("=", 1)[0].strip() == "method":
            raise ConfigError(f"--methods: {text!r} sets method in its options; write the method before the brackets")
    label = match["label"] or "_".join([method, *map(_slug, options)])
    return Variant(check_label(label.strip(), f"--methods {text!r}"), method, tuple(options))


def _from_mapping(label: str, options: object, source: Path) -> Variant:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: variant {label!r} must map to {{key: value}} options, got {options!r}")
    method = str(options.get("method", label))
    overrides = tuple(f"{k}={json.dumps(v)}" for k, v in options.items() if k != "method")
    return Variant(check_label(str(label), f"{source}"), method, overrides)


def load_variants_file(path: Path) -> list[Variant]:
    """Variants from a YAML file: a mapping ``label: {key: value}`` or a list of ``--methods`` strings."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--methods {path}: cannot read it ({exc})") from exc
    if isinstance(data, dict):
        return [_from_mapping(str(k), v, path) for k, v in data.items()]
    if isinstance(data, list) and all(isinstance(item, str) for item in data):
        return [parse_spec(item) for item in data]
    raise ConfigError(f"--methods {path}: expected a mapping label -> {{key: value}} or a list of "
                      "[LABEL=]METHOD[KEY=VALUE,...] strings")


def parse_methods(text: str) -> list[Variant]:
    """The variants of ``--methods`` (a list, or a YAML file); labels must be distinct."""
    path = Path(text)
    variants = load_variants_file(path) if path.suffix in (".yaml", ".yml") else [parse_spec(s) for s in
                                                                                  split_top(text)]
    if not variants:
        raise ConfigError("--methods names no method")
    labels = [v.label for v in variants]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ConfigError(f"--methods: label(s) {', '.join(twice)} given twice; name variants apart with "
                          "LABEL=METHOD[...]")
    return variants


def _section(assignment: str) -> str | None:
    """The option section an override sets (``inflora`` for ``inflora.rank=8``), None for other keys."""
    head = assignment.split("=", 1)[0].strip().split(".")[0]
    return head if head in SECTIONS else None


def resolve(preset: str | None, variant: Variant, common: list[str], seed: int | None = None) -> RunConfig:
    """The resolved config of ``variant``: the preset, the common overrides (those of an option section only when
    the variant's method or classifier owns it), the variant's own, then the seed."""
    plain = [o for o in common if _section(o) is None]
    tail = [*variant.all_overrides(), *([f"seed={seed}"] if seed is not None else [])]
    try:
        probe = load_config(preset, [*plain, *tail])
        chosen = {probe.method, probe.classifier}
        return load_config(preset, [*plain, *(o for o in common if _section(o) in chosen), *tail])
    except ConfigError as exc:
        raise ConfigError(f"method {variant.label!r}: {exc}") from None


def variant_overrides(preset: str | None, variant: Variant, common: list[str]) -> list[str]:
    """The ``--set`` list one run of ``variant`` gets (what :func:`resolve` applies, without the seed)."""
    chosen = {(config := resolve(preset, variant, common)).method, config.classifier}
    return [*(o for o in common if _section(o) is None or _section(o) in chosen), *variant.all_overrides()]


def check_sections_used(preset: str | None, variants: list[Variant], common: list[str]) -> None:
    """Refuse a common option-section override that no variant's method or classifier owns."""
    owned = set()
    for variant in variants:
        config = resolve(preset, variant, common)
        owned |= {config.method, config.classifier}
    stray = [o for o in common if (s := _section(o)) is not None and s not in owned]
    if stray:
        raise ConfigError(f"--set {', '.join(stray)}: no compared method or classifier has that option section "
                          f"(methods and classifiers compared: {', '.join(sorted(owned))})")

"""``inflora config``'s listing: every configuration key with its default and help text."""

from __future__ import annotations

import dataclasses

from .config import SECTIONS, RunConfig


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every configuration field, then every registered option section."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_fields(type(value), prefix=f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    if cls is RunConfig:
        for section, (kind, options) in sorted(SECTIONS.items()):
            rows.extend((key, default, f"[{kind} {section}] {text}")
                        for key, default, text in describe_fields(options, prefix=f"{section}."))
    return rows

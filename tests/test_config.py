"""Typed configuration: presets, overrides and their validation."""

from __future__ import annotations

import pytest

from inflora.config import ConfigError, describe_fields, list_presets, load_config, set_override


def test_every_preset_resolves_and_has_a_description() -> None:
    presets = list_presets()
    assert presets and all(presets.values())
    for name in presets:
        config = load_config(name)
        assert config.benchmark == name


def test_overrides_are_typed() -> None:
    config = load_config(None, ["train.epochs=3", "method=seqlora", "adapter.blocks=5", "train.milestones=[2, 4]",
                                "model.options={img_size: 32}", "scenario.order_seed=null", "train.lr=1e-3"])
    assert config.train.epochs == 3 and config.method == "seqlora" and config.adapter.blocks == 5
    assert config.train.milestones == [2, 4] and config.model.options == {"img_size": 32}
    assert config.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochs=two", "expected an integer"),
    ("adapter.memory=dual", "not one of dualgpm, gpm"),
    ("nope=1", "unknown key 'nope'"),
    ("train.nope=1", "valid keys here"),
    ("train.epochs=0", "must be >= 1"),
    ("method=bogus", "not one of"),
    ("noequals", "key=value"),
    ("alignment.enabled=maybe", "true or false"),
])
def test_bad_overrides_are_explained(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="clinc150"):
        load_config("no-such-preset")


def test_every_field_has_help() -> None:
    rows = describe_fields()
    assert all(help_text for _, _, help_text in rows)
    assert any(key == "adapter.rank" for key, _, _ in rows)


def test_set_override_nested() -> None:
    config = load_config(None)
    set_override(config, "alignment.logit_norm=0.1")
    assert config.alignment.logit_norm == pytest.approx(0.1)

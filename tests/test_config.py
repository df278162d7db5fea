"""Typed configuration: presets, overrides and their validation."""

from __future__ import annotations

import pytest

from inflora.config import ConfigError, from_dict, list_presets, load_config, set_override, to_dict
from inflora.confighelp import describe_fields


def test_every_preset_resolves_and_has_a_description() -> None:
    presets = list_presets()
    assert presets and all(presets.values())
    for name in presets:
        config = load_config(name)
        assert config.benchmark == name


def test_overrides_are_typed() -> None:
    config = load_config(None, ["train.epochs=3", "method=seqlora", "seqlora.blocks=5", "train.milestones=[2, 4]",
                                "model.options={img_size: 32}", "scenario.order_seed=null", "train.lr=1e-3"])
    assert config.train.epochs == 3 and config.method == "seqlora" and config.method_options.blocks == 5
    assert config.train.milestones == [2, 4] and config.model.options == {"img_size": 32}
    assert config.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochs=two", "expected an integer"),
    ("inflora.memory=dual", "not one of dualgpm, gpm"),
    ("nope=1", "unknown key 'nope'"),
    ("train.nope=1", "valid keys here"),
    ("train.epochs=0", "must be >= 1"),
    ("method=bogus", "not one of"),
    ("noequals", "key=value"),
    ("aligned.epochs=maybe", "expected an integer"),
    ("inflora.lamb=1.5", "must lie in"),
    ("inflora.rank=0", "rank must be >= 1"),
    ("train.lr=.nan", "finite number"),
    ("train.lr=.inf", "finite number"),
    ("classifier=bogus", "not one of aligned, linear"),
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
    assert any(key == "inflora.rank" for key, _, _ in rows)


def test_set_override_nested() -> None:
    config = load_config(None)
    set_override(config, "aligned.logit_norm=0.1")
    assert config.classifier_options.logit_norm == pytest.approx(0.1)


def test_method_sections_belong_to_their_method() -> None:
    """Each method's options live in the section named after it; an option the chosen method lacks is an error
    naming the valid ones; a preset's section for its default method does not block switching methods."""
    config = load_config("clinc150", ["method=seqlora"])  # the preset has an `inflora:` section
    resolved = to_dict(config)
    assert "seqlora" in resolved and "inflora" not in resolved and resolved["seqlora"]["rank"] == 10
    with pytest.raises(ConfigError, match=r"seqlora\.rank"):
        load_config("clinc150", ["method=seqlora", "inflora.rank=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'seqlora.lamb'.*seqlora.rank"):
        load_config(None, ["seqlora.lamb=0.9"])
    frozen = to_dict(load_config(None, ["method=frozen", "classifier=linear"]))
    assert not ({"inflora", "seqlora", "aligned"} & set(frozen)) and "linear" in frozen


def test_resolved_config_round_trips() -> None:
    config = load_config("clinc150", ["inflora.rank=7", "aligned.epochs=3"])
    again = from_dict(to_dict(config))
    assert to_dict(again) == to_dict(config)
    assert again.method_options.rank == 7 and again.classifier_options.epochs == 3


def test_config_module_imports_nothing_from_the_package() -> None:
    import ast
    import inspect

    from inflora import config as module

    tree = ast.parse(inspect.getsource(module))
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [n for n in imports if n.level > 0 or (n.module or "").startswith("inflora")]


# ------------------------------------------------------------------------------------------------ command line checks
@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "-1"], "seeds"),
    (["--seeds", "0,9223372036854775808"], "seeds"),
    (["--seeds", "1.5"], "seeds"),
    (["--set", "train.lr=nan"], "train.lr"),
    (["--set", "train.lr=inf"], "train.lr"),
    (["--set", "train.lr=-inf"], "train.lr"),
])
def test_run_refuses_bad_seeds_and_learning_rates_up_front(args: list[str], message: str, tmp_path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from inflora import cli

    assert cli.main(["run", "--out", str(tmp_path / "out"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inflora: config error:") and message in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_trust_remote_code_only_from_the_command_line(tmp_path) -> None:
    import yaml

    preset = tmp_path / "untrusted.yaml"
    preset.write_text(yaml.safe_dump({"model": {"backbone": "hf:/some/model", "options": {"trust_remote_code": True}}}))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_config(str(preset))
    config = load_config(str(preset), ["model.options={trust_remote_code: true}"])
    assert config.model.options == {"trust_remote_code": True}
    assert load_config(None, ["model.options={trust_remote_code: true}"]).model.options["trust_remote_code"] is True

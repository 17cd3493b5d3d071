"""Config schema: YAML + dotted overrides, type checks, unknown keys with close matches, validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdforge.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    load_yaml,
    parse_override,
)
from kdforge.errors import ConfigError
from kdforge.validation import flat_keys, validate


def test_defaults_and_roundtrip(tmp_path):
    cfg = RunConfig()
    text = dump_yaml(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.1}\ntrain:\n  epochs: 5\nmethod: {name: kd, temperature: 2}\n")
    cfg = load_config(path, ["optim.lr=0.02", "train.epochs=7", "method.temperature=3", "schedule.milestones=[2,4]"])
    assert cfg.optim.lr == 0.02
    assert cfg.train.epochs == 7
    assert cfg.method.name == "kd" and cfg.method.params == {"temperature": 3}
    assert cfg.schedule.milestones == [2, 4]


def test_int_to_float_and_yaml_exponent_string():
    cfg = config_from_dict({"optim": {"lr": 1, "weight_decay": "5e-4"}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(5e-4)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"optim": {"lrr": 0.1}}, "unknown config key 'optim.lrr'; closest valid keys: optim.lr"),
        ({"trian": {}}, "unknown config key 'trian'; closest valid keys: train"),
        ({"train": {"epochs": "ten"}}, "train.epochs must be an integer, got 'ten'"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
        ({"train": {"compile": "yes"}}, "train.compile must be true/false"),
        ({"optim": {"name": "sgdd"}}, "did you mean 'sgd'"),
        ({"optim": {"betas": [0.9]}}, "optim.betas must have 2 entries"),
        ({"data": 3}, "data must be a mapping"),
        ([1, 2], "the config must be a mapping"),
    ],
)
def test_bad_keys_and_types(data, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_method_params_checked_against_constructor():
    cfg = config_from_dict({"method": {"name": "kd", "temprature": 2}, "teacher": {"name": "resnet8"}})
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'method.temprature'; closest valid keys: "
        r"method.temperature",
    ):
        validate(cfg)
    cfg = config_from_dict({"method": {"name": "kd", "temperature": "hot"}, "teacher": {"name": "resnet8"}})
    with pytest.raises(ConfigError, match="method.temperature must be a number"):
        validate(cfg)
    cfg = config_from_dict({"method": {"name": "kd", "num_classes": 3}, "teacher": {"name": "resnet8"}})
    with pytest.raises(ConfigError, match="set by kdforge from the run itself"):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["method.name=kdd"], "unknown method 'kdd'; did you mean 'kd'"),
        (["model.name=resnet9"], "unknown model 'resnet9'"),
        (["data.name=cifar11"], "unknown dataset 'cifar11'"),
        (["optim.lr=-1"], "optim.lr must be in (0, 10]"),
        (["train.epochs=0"], "train.epochs must be at least 1"),
        (["schedule.milestones=[5,3]"], "schedule.milestones must be increasing"),
        (["data.batch_size=0"], "data.batch_size must be at least 1"),
        (["teacher=null"], "method 'kd' needs a teacher"),
    ],
)
def test_validate_values(overrides, fragment):
    cfg = load_config(None, ["teacher.name=resnet20", *overrides], defaults={"method": {"name": "kd"}})
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert fragment in str(err.value)


def test_train_command_refuses_distillation_method():
    cfg = load_config(None, ["teacher.name=resnet20"], defaults={"method": {"name": "kd"}})
    with pytest.raises(ConfigError, match="use `kdforge distill`"):
        validate(cfg, "train")


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="line"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(listy)


def test_override_syntax():
    assert parse_override("optim.lr=0.1") == (["optim", "lr"], 0.1)
    assert parse_override("teacher.checkpoint=runs/a b") == (["teacher", "checkpoint"], "runs/a b")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("optim..lr=1")
    with pytest.raises(ConfigError, match="is not a mapping"):
        apply_overrides({"train": 3}, ["train.epochs=2"])


def test_flat_keys_cover_method_params():
    keys = flat_keys(config_from_dict({"method": {"name": "kd"}}))
    assert {"optim.lr", "train.epochs", "method.temperature", "method.kd_weight", "data.batch_size"} <= set(keys)


_simple = st.one_of(
    st.integers(-5, 500),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(alphabet="abcxyz_", min_size=1, max_size=6),
)


@given(
    key=st.sampled_from(
        [
            "train.epochs",
            "optim.lr",
            "train.compile",
            "data.name",
            "schedule.gamma",
            "data.batch_size",
            "train.grad_clip",
        ]
    ),
    value=_simple,
)
def test_overrides_either_apply_typed_or_fail_with_one_line(key, value):
    text = f"{key}={'true' if value is True else 'false' if value is False else value}"
    try:
        cfg = load_config(None, [text])
    except ConfigError as err:
        assert "\n" not in str(err) and key in str(err)
        return
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    expected_type = {
        "train.epochs": int,
        "optim.lr": float,
        "train.compile": bool,
        "data.name": str,
        "schedule.gamma": float,
        "data.batch_size": int,
        "train.grad_clip": float,
    }[key]
    assert isinstance(got, expected_type)


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("method: {name: kd}\ndata: {name: embedded}\nmethod:\n  name: dkd\n", "'method'", (1, 3)),
        ("train:\n  epochs: 3\n  seed: 1\n  epochs: 4\n", "'epochs'", (2, 4)),  # nested mappings too
        ("optim: {lr: 0.1, lr: 0.2}\n", "'lr'", (1, 1)),
    ],
)
def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value).startswith(f"{path}: key {key} is given twice, at lines {lines[0]} and {lines[1]}")
    assert "\n" not in str(err.value)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    # `<<: *base` then an explicit key is YAML's override idiom, not a duplicate.
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {epochs: 3, seed: 1}\ntrain:\n  <<: *b\n  epochs: 5\n")
    assert load_yaml(path)["train"] == {"epochs": 5, "seed": 1}

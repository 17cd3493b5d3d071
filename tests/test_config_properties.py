"""Properties of config parsing over whole YAML documents and dotted overrides.

Whatever a user writes in a config file or on the command line either becomes a ``RunConfig`` that passes
``validate`` or fails with one ``ConfigError`` line; valid configs survive dump → load unchanged; an override changes
its key and nothing else. The strategies are built from the dataclass fields and the methods' constructor signatures,
so a new config key or method parameter is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kdforge.cli import main
from kdforge.config import (
    MethodConfig,
    ModelConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
)
from kdforge.data import list_datasets
from kdforge.errors import ConfigError
from kdforge.methods import METHODS
from kdforge.methods.params import CONTEXT_ARGS, check_method_params, method_signature
from kdforge.models import list_models
from kdforge.validation import validate

# ----------------------------------------------------------------------------------------------------------------
# The schema, read from the dataclasses and the method constructors (never listed by hand).

ROOT_HINTS = typing.get_type_hints(RunConfig)


def _section_class(tp: Any) -> type:
    """The dataclass of a section type (``X`` or ``X | None``)."""
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg):
            return arg
    raise TypeError(f"RunConfig field of type {tp} is not a section dataclass; teach these tests about it")


SECTIONS = {
    f.name: _section_class(ROOT_HINTS[f.name])
    for f in dataclasses.fields(RunConfig)
    if f.name not in ("method", "task")
}
SECTION_HINTS = {sec: typing.get_type_hints(cls) for sec, cls in SECTIONS.items()}
# (dotted key, type) of every leaf outside the method section.
LEAVES = [(f"{sec}.{name}", tp) for sec, hints in SECTION_HINTS.items() for name, tp in hints.items()]
METHOD_NAMES = METHODS.names()


def method_hints(name: str) -> dict[str, Any]:
    cls = METHODS.get(name)
    hints = typing.get_type_hints(cls.__init__)
    return {k: hints.get(k, Any) for k in method_signature(cls)}


# Names a run can use: the registries fill these keys when a test needs validate to get past the name checks.
REGISTRY_NAMES = {
    "model.name": st.sampled_from(list_models()),
    "teacher.name": st.sampled_from(list_models()),
    "data.name": st.sampled_from(list_datasets()),
}
ALL_KEY_WORDS = sorted(
    {"name", *SECTIONS, *(k.split(".")[1] for k, _ in LEAVES), *(p for m in METHOD_NAMES for p in method_hints(m))}
)


def settable(cfg: RunConfig) -> list[tuple[str, Any]]:
    """Every settable dotted key of ``cfg`` (its method's parameters included) with its type."""
    return [*LEAVES, ("method.name", str), *((f"method.{k}", tp) for k, tp in method_hints(cfg.method.name).items())]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def valid_values(tp: Any) -> st.SearchStrategy[Any]:
    """Values of exactly type ``tp``, as a parsed config holds them (a tuple for a tuple, a float for a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return st.one_of([valid_values(a) for a in args])
    if tp is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(valid_values(args[0]), max_size=3)
    if origin is tuple and Ellipsis not in args:
        return st.tuples(*(valid_values(a) for a in args))
    atoms = {
        bool: st.booleans(),
        int: st.integers(-(2**63), 2**63 - 1),
        float: st.floats(),  # nan and ±inf included: YAML writes them as .nan/.inf
        str: st.text(max_size=12),
    }
    if tp not in atoms:
        raise TypeError(f"config type {tp} has no strategy in these tests; add one to valid_values")
    return atoms[tp]


def sections(registry_names: bool) -> dict[str, st.SearchStrategy[Any]]:
    out = {}
    for sec, cls in SECTIONS.items():
        fields = {}
        for name, tp in SECTION_HINTS[sec].items():
            key = f"{sec}.{name}"
            fields[name] = REGISTRY_NAMES[key] if registry_names and key in REGISTRY_NAMES else valid_values(tp)
        built = st.builds(cls, **fields)
        out[sec] = st.one_of(st.none(), built) if _is_union(ROOT_HINTS[sec]) else built
    return out


@st.composite
def methods(draw: st.DrawFn) -> MethodConfig:
    name = draw(st.sampled_from(METHOD_NAMES))
    params = draw(st.fixed_dictionaries({}, optional={k: valid_values(tp) for k, tp in method_hints(name).items()}))
    return MethodConfig(name=name, params=params)


def run_configs(registry_names: bool = False) -> st.SearchStrategy[RunConfig]:
    """Type-correct configs over every key (values need not pass ``validate``'s range checks)."""
    return st.builds(RunConfig, method=methods(), **sections(registry_names))


# ----------------------------------------------------------------------------------------------------------------
# Arbitrary YAML-able values and documents.

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**60, max_value=2**1100),  # past int64 and past the float range
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["1e-3", "nan", "-inf", "yes", "null", "~", "0x1f", "1:30", "2001-12-14", "'", "a: b", "- x"]),
)
KEYS = st.one_of(st.sampled_from(ALL_KEY_WORDS), st.text(max_size=8), st.integers(-3, 3), st.booleans(), st.none())
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
)


def _plain(value: Any) -> Any:
    """Tuples as lists, so PyYAML's safe dumper can write the value."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@st.composite
def schema_documents(draw: st.DrawFn) -> dict[Any, Any]:
    """Mappings shaped like a config (real section and field names, mostly well-typed values) with stray parts.

    Every field's type meets both well-typed values and arbitrary ones, nested sections and method parameters too.
    """
    doc: dict[Any, Any] = {}
    for sec in draw(st.lists(st.sampled_from([*SECTIONS, "method"]), unique=True, max_size=len(SECTIONS) + 1)):
        if sec == "method":
            name = draw(st.sampled_from(METHOD_NAMES))
            hints = method_hints(name)
        else:
            hints = SECTION_HINTS[sec]
        body: dict[Any, Any] = {"name": name} if sec == "method" else {}
        for key in draw(st.lists(st.sampled_from(sorted(hints)), unique=True, max_size=5)):
            body[key] = draw(st.one_of(valid_values(hints[key]).map(_plain), VALUES))
        if draw(st.integers(0, 9)) == 0:  # now and then a stray key or a whole non-mapping section
            body = draw(
                st.one_of(
                    st.none(), VALUES, st.dictionaries(KEYS, VALUES, max_size=2).map(lambda d, b=body: {**b, **d})
                )
            )
        doc[sec] = body
    if draw(st.integers(0, 9)) == 0:
        doc[draw(KEYS)] = draw(VALUES)
    return doc


def _dump(value: Any) -> str:
    return yaml.safe_dump(_plain(value), sort_keys=False)


YAML_CHARS = "{}[]:,-?&*!|>'\"%@`#\n\t .~=x1"


@st.composite
def mutated(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> str:
    """A YAML text with one character inserted or deleted: mostly-valid documents with one syntax slip."""
    text = draw(texts)
    at = draw(st.integers(0, len(text)))
    if text and draw(st.booleans()):
        return text[:at] + text[at + 1 :]
    return text[:at] + draw(st.sampled_from(list(YAML_CHARS))) + text[at:]


@st.composite
def near_valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A config that passes ``validate`` with up to three keys changed to well-typed or arbitrary values.

    ``validate`` checks one thing after another; starting from a valid config lets every check, the last ones
    included, see a bad value.
    """
    name = draw(st.sampled_from(METHOD_NAMES))
    cls = METHODS.get(name)
    teacher = ModelConfig() if getattr(cls, "needs_teacher", False) else None
    doc = config_to_dict(RunConfig(method=MethodConfig(name=name), teacher=teacher))
    if getattr(cls, "needs_views", False):
        doc["data"]["views"] = "jda"
    for _ in range(draw(st.integers(0, 3))):
        key, tp = draw(st.sampled_from(settable(RunConfig(method=MethodConfig(name=name)))))
        _set(doc, key, draw(st.one_of(valid_values(tp).map(_plain), VALUES)))
    return doc


DOCUMENTS = st.one_of(
    near_valid_documents().map(_dump),
    schema_documents().map(_dump),
    VALUES.map(_dump),  # any YAML value at the top: mappings, but also lists, scalars, null
    mutated(schema_documents().map(_dump)),
    st.text(alphabet=YAML_CHARS, max_size=30),
    st.text(max_size=30),
    st.binary(max_size=30),  # a binary file passed by mistake (a checkpoint, an image)
)


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _canon(value: Any) -> Any:
    """``value`` with every leaf tagged by its type, so 1 == 1.0 == True and nan != nan don't hide a change."""
    if isinstance(value, Mapping):
        return {k: _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return (type(value).__name__, repr(value))


def _inline(value: Any) -> str:
    """``value`` written as YAML for the right-hand side of ``key=value`` (one line, flow style)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=2**31)
    return text.removesuffix("...\n").strip()


def _set(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in a ``config_to_dict`` mapping (a ``None`` teacher becomes the default section first)."""
    sec, name = key.split(".", 1)
    if doc[sec] is None:
        doc[sec] = config_to_dict(RunConfig(teacher=SECTIONS[sec]()))[sec]
    doc[sec][name] = _plain(value)


def _write(path: Path, doc: str | bytes) -> Path:
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc, encoding="utf-8")
    return path


def _check_error(err: ConfigError) -> str:
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, f"not one line: {message!r}"
    return message


def _build_and_validate(load: typing.Callable[[], RunConfig], command: str, doc_path: Path) -> None:
    """``load()`` then ``validate``: a ConfigError line, or a config that also survives dump → load."""
    try:
        cfg = validate(load(), command)  # type: ignore[arg-type]
    except ConfigError as err:
        _check_error(err)
        return
    text = dump_yaml(cfg)
    again = validate(load_config(_write(doc_path, text)), command)  # type: ignore[arg-type]
    assert _canon(config_to_dict(again)) == _canon(config_to_dict(cfg))


@pytest.fixture(scope="module")
def doc_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One file rewritten by every example: hypothesis runs many examples per test, a fresh tmp_path each is slow.
    return tmp_path_factory.mktemp("docs") / "config.yaml"


# The CLI's defaults per command, plus a teacher for `distill` so that validate gets past its first checks.
CLI_DEFAULTS = {
    "train": {"method": {"name": "vanilla"}},
    "distill": {"method": {"name": "kd"}, "teacher": {"name": "resnet8"}},
}

# ----------------------------------------------------------------------------------------------------------------
# Any input: a valid config or one ConfigError line, never another exception.


@settings(max_examples=150, deadline=None)
@given(doc=DOCUMENTS, command=st.sampled_from(["train", "distill"]))
@example(doc=b"\x80\x81PK\x03\x04", command="distill")  # a binary file: UnicodeDecodeError before the fix
@example(doc="optim: {lr: " + "9" * 400 + "}\n", command="distill")  # int past the float range: OverflowError
@example(doc="optim: &a {lr: 0.1, x: *a}\n", command="distill")  # alias inside itself: RecursionError
@example(doc="model: " + "[" * 1000 + "]" * 1000 + "\n", command="distill")  # nesting past the recursion limit
@example(doc="model: {name: 2001-13-45}\n", command="distill")  # a date PyYAML can't build: ValueError
@example(doc="model: {num_classes: " + "9" * 5000 + "}\n", command="distill")  # > 4300 digits: ValueError
@example(doc="model: {name: 0x" + "f" * 4000 + "}\n", command="distill")  # hex int too long to repr
@example(doc="train: {epochs: 0x" + "f" * 4000 + "}\n", command="distill")  # ... or for validate's f-strings
@example(doc="teacher: {name: resnet8}\nmethod: {name: kd, 1: 2}\n", command="distill")  # int param key
@example(doc='optim: {"lr\\nx": 1}\n', command="distill")  # a line break inside an unknown key
@example(doc="model:\n", command="train")  # an empty section is null: AttributeError in validate
# inf passed validate, then round(inf * steps) raised OverflowError when the run built its scheduler.
@example(doc="teacher: {name: resnet8}\nschedule: {warmup_epochs: .inf}\n", command="distill")
def test_any_yaml_document_gives_a_valid_config_or_one_config_error(doc_path, doc, command):
    _write(doc_path, doc)
    _build_and_validate(lambda: load_config(doc_path, defaults=CLI_DEFAULTS[command]), command, doc_path)


@settings(max_examples=120, deadline=None)
@given(
    data=st.one_of(near_valid_documents(), schema_documents(), VALUES), command=st.sampled_from(["train", "distill"])
)
@example(data={"model": None}, command="train")  # a null section that may not be absent: AttributeError in validate
def test_any_mapping_gives_a_valid_config_or_one_config_error(doc_path, data, command):
    _build_and_validate(lambda: config_from_dict(data), command, doc_path)


# Every dotted key with its type; a parameter name that several methods share keeps one of their types.
FLAT_TYPES = dict([*LEAVES, *((f"method.{p}", tp) for m in METHOD_NAMES for p, tp in method_hints(m).items())])
DOTTED_KEYS = st.one_of(
    st.sampled_from([*FLAT_TYPES, *SECTIONS, "method", "method.name"]),
    st.lists(st.one_of(st.sampled_from(ALL_KEY_WORDS), st.text(max_size=5)), min_size=1, max_size=3).map(".".join),
)
OVERRIDES = st.one_of(
    st.sampled_from(sorted(FLAT_TYPES.items())).flatmap(
        lambda kt: valid_values(kt[1]).map(lambda v, k=kt[0]: f"{k}={_inline(v)}")
    ),
    st.tuples(DOTTED_KEYS, st.one_of(VALUES.map(_inline), st.text(alphabet=YAML_CHARS, max_size=12))).map("=".join),
    st.text(max_size=20),
)


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(OVERRIDES, max_size=4), command=st.sampled_from(["train", "distill"]))
@example(overrides=["model.name=2001-13-45"], command="distill")  # ValueError from PyYAML's date constructor
@example(overrides=["model.name=" + "[" * 1000], command="distill")  # RecursionError in PyYAML's parser
def test_any_overrides_give_a_valid_config_or_one_config_error(doc_path, overrides, command):
    _build_and_validate(lambda: load_config(None, overrides, defaults=CLI_DEFAULTS[command]), command, doc_path)


# ----------------------------------------------------------------------------------------------------------------
# Valid configs: dump → load and overrides change exactly what they name.


@settings(max_examples=60, deadline=None)
@given(cfg=run_configs())
def test_dump_then_load_gives_the_same_config(doc_path, cfg):
    text = dump_yaml(cfg)
    again = load_config(_write(doc_path, text))
    assert _canon(config_to_dict(again)) == _canon(config_to_dict(cfg))
    assert dump_yaml(again) == text
    # The generated parameters follow the constructor's types, so the loaded ones type-check unchanged.
    params = check_method_params(METHODS.get(again.method.name), again.method.params)
    assert _canon(params) == _canon(cfg.method.params)


@settings(max_examples=80, deadline=None)
@given(cfg=run_configs(), data=st.data())
def test_override_sets_exactly_its_key(cfg, data):
    key, tp = data.draw(st.sampled_from(settable(cfg)))
    value = data.draw(valid_values(tp))
    got = load_config(None, [f"{key}={_inline(value)}"], defaults=config_to_dict(cfg))
    expected = config_to_dict(cfg)
    _set(expected, key, value)
    assert _canon(config_to_dict(got)) == _canon(expected)


@settings(max_examples=60, deadline=None)
@given(cfg=run_configs(), data=st.data())
def test_later_override_of_a_key_wins(doc_path, cfg, data):
    key, tp = data.draw(st.sampled_from(settable(cfg)))
    first, last = data.draw(valid_values(tp)), data.draw(valid_values(tp))
    other, other_tp = data.draw(st.sampled_from(settable(cfg)))
    other_value = data.draw(valid_values(other_tp))
    _write(doc_path, dump_yaml(cfg))
    overrides = [f"{key}={_inline(first)}", f"{other}={_inline(other_value)}", f"{key}={_inline(last)}"]
    got = load_config(doc_path, overrides)
    expected = config_to_dict(cfg)
    _set(expected, key, first)
    _set(expected, other, other_value)
    _set(expected, key, last)
    assert _canon(config_to_dict(got)) == _canon(expected)


# ----------------------------------------------------------------------------------------------------------------
# Unknown keys and wrong types name the key (and the expected type).


@settings(max_examples=80, deadline=None)
@given(
    cfg=run_configs(registry_names=True),
    where=st.sampled_from(["", *SECTIONS, "method"]),
    bad=st.one_of(st.text(min_size=1, max_size=10), st.integers(), st.booleans()),
)
@example(cfg=RunConfig(teacher=ModelConfig()), where="method", bad=1)  # AttributeError before the fix
@example(cfg=RunConfig(), where="optim", bad="lr\nrate")  # the message used to span two lines
def test_unknown_key_anywhere_is_named(cfg, where, bad):
    doc = config_to_dict(cfg)
    if where == "":
        valid, node, full = set(doc), doc, str(bad)
    else:
        valid = set(method_hints(cfg.method.name)) | {"name"} if where == "method" else set(SECTION_HINTS[where])
        doc[where] = doc[where] if doc[where] is not None else {}
        node, full = doc[where], f"{where}.{bad}"
    if bad in valid:
        return
    node[bad] = 1
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict(doc))  # unknown method parameters are caught by validate, the rest on loading
    message = _check_error(err.value)
    if where == "method" and bad in CONTEXT_ARGS:
        assert f"{full} is set by kdforge" in message
    else:
        assert message.startswith(f"unknown config key {full!r}"), message


def _accepts(tp: Any, value: Any) -> bool:
    """The documented coercion rules, restated independently of ``coerce``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return any(_accepts(a, value) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin in (list, tuple):
        fixed = origin is tuple and Ellipsis not in args
        return (
            isinstance(value, list)
            and (not fixed or len(value) == len(args))
            and all(_accepts(args[i] if fixed else args[0], v) for i, v in enumerate(value))
        )
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # an integral float is fine; the value must fit a 64-bit integer
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if tp is float:  # a YAML 1.1 string like "1e-3" is a number; an int past the float range is not
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return False
        try:
            float(value)
        except (ValueError, OverflowError):
            return False
        return True
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"_accepts does not know {tp}")


def _type_words(tp: Any) -> list[str]:
    """Phrases an error about ``tp`` may use for the expected type (a nested element's type included)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return [w for a in args if a is not type(None) for w in _type_words(a)]
    if origin is Literal:
        return ["one of " + ", ".join(map(repr, args))]
    if origin in (list, tuple):
        return ["a list of", "entries", *(w for a in args for w in _type_words(a))]
    return [{bool: "true/false", int: "an integer", float: "a number", str: "a string"}[tp]]


# Wrong-value candidates by kind, each kind drawn equally often: left to one strategy, hypothesis rarely pairs a
# given key type with a given wrong kind (an int for a bool key, say).
KINDS = {
    "bool": st.booleans(),
    "int": st.integers(-3, 3) | st.integers(-(2**63), 2**63 - 1),
    "huge int": st.integers(2**63, 2**1100),
    "float": st.floats(),
    "integral float": st.integers(-5, 5).map(float),
    "str": st.text(max_size=8),
    "yaml-ish str": st.sampled_from(["1e-3", "nan", "yes", "null", "0x1f", "3", "sgd", "resnet8", ""]),
    "null": st.none(),
    "list": st.lists(SCALARS, max_size=3) | st.lists(st.integers(-3, 300), max_size=3),
    "mapping": st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
}
CANDIDATES = st.sampled_from(sorted(KINDS)).flatmap(KINDS.__getitem__)


def _kind(tp: Any) -> str:
    """bool, int, float, str, Literal, list or tuple: the type without ``| None`` and without its arguments."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    return str(typing.get_origin(args[0]) or args[0])


@settings(max_examples=200, deadline=None)
@given(cfg=run_configs(registry_names=True), data=st.data())
def test_wrong_type_names_key_and_expected_type(cfg, data):
    # The key's kind first, so bool keys (a seventh of the kinds, fewer of the keys) are not drawn too rarely.
    by_kind: dict[str, list[tuple[str, Any]]] = {}
    for key, tp in settable(cfg):
        if key != "method.name":
            by_kind.setdefault(_kind(tp), []).append((key, tp))
    key, tp = data.draw(st.sampled_from(sorted(by_kind)).flatmap(lambda kind: st.sampled_from(by_kind[kind])))
    value = data.draw(CANDIDATES)
    if _accepts(tp, value):
        return
    doc = config_to_dict(cfg)
    _set(doc, key, value)
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict(doc))
    message = _check_error(err.value)
    assert key in message and "must" in message, message
    assert any(w in message for w in _type_words(tp)), f"{message!r} does not say {_type_words(tp)}"


# One value of each kind a YAML document holds, at the edges the coercion rules draw.
REPRESENTATIVES = [
    *(True, False, None),
    *(0, 3, -(2**63), 2**63, 10**400),
    *(1.5, 2.0, math.nan, -math.inf),
    *("abc", "1e-3", "", "sgd", "auto", "none"),
    *([], [1], [1, 2], [0.5, 0.5], ["a"], [None], {"a": 1}),
]


def test_every_key_takes_exactly_its_types():
    """Each key against each representative: accepted exactly when the coercion rules say so, else a named error.

    Exhaustive where the property above samples: random draws rarely pair, say, a bool key with an int.
    """
    cases = [(key, tp, None) for key, tp in LEAVES]
    cases += [(f"method.{p}", tp, METHODS.get(m)) for m in METHOD_NAMES for p, tp in method_hints(m).items()]
    for key, tp, method_cls in cases:
        sec, name = key.split(".", 1)
        for value in REPRESENTATIVES:
            try:
                if method_cls is None:
                    config_from_dict({sec: {name: value}})
                else:
                    check_method_params(method_cls, {name: value})
            except ConfigError as err:
                message = _check_error(err)
                assert not _accepts(tp, value), f"{key}={value!r} ({tp}) refused: {message}"
                assert key in message and any(w in message for w in _type_words(tp)), message
            else:
                assert _accepts(tp, value), f"{key}={value!r} accepted, but {tp} should refuse it"


# ----------------------------------------------------------------------------------------------------------------
# The command line: a bad config is one `kdforge: error:` line on stderr, exit status 2, no run directory.


@st.composite
def bad_documents(draw: st.DrawFn) -> str:
    """A valid config's YAML with one fault that loading or validate must catch: an unknown key or a wrong type."""
    doc = config_to_dict(draw(run_configs(registry_names=True)))
    if draw(st.booleans()):
        sec = draw(st.sampled_from(sorted(SECTIONS)))
        doc[sec] = doc[sec] or {}
        doc[sec][draw(st.sampled_from(["lrr", "epoch", "nmae", "batchsize"]))] = 1
    else:
        key, tp = draw(st.sampled_from(LEAVES))
        _set(doc, key, draw(SCALARS.filter(lambda v, tp=tp: not _accepts(tp, v))))
    return _dump(doc)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(bad_documents(), st.sampled_from(["- 1\n- 2\n", "train: {epochs: 3\n"])))
@example(doc=b"\x89PNG\r\n\x1a\n\x00")
def test_cli_reports_a_bad_config_in_one_line(tmp_path, monkeypatch, capsys, doc):
    monkeypatch.chdir(tmp_path)  # the default run directory would be ./runs/...
    config = _write(tmp_path / "bad.yaml", doc)
    out = tmp_path / "run"
    code = main(["distill", "--config", str(config), "--out", str(out), "data.num_workers=0"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("kdforge: error: ") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""
    assert not out.exists() and not (tmp_path / "runs").exists()
    code = main(["distill", "--config", str(config), "data.num_workers=0"])  # no --out: nothing under ./runs
    assert code == 2 and not (tmp_path / "runs").exists()
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------------------
# Regressions: inputs the properties above found, as plain tests.


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (b"\x80\x81PK\x03\x04", "not a UTF-8 text file"),
        ("optim: &a {lr: 0.1, x: *a}\n", "an alias that contains itself"),
        ("model: " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
        ("model: {name: 2001-13-45}\n", "month must be in 1..12"),
        ("model: {num_classes: " + "9" * 5000 + "}\n", "4300 digits"),
    ],
)
def test_unreadable_yaml_is_a_config_error(tmp_path, doc, fragment):
    path = _write(tmp_path / "c.yaml", doc)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in _check_error(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"model": None}, "model must be a mapping of keys to values, got NoneType"),
        ({"optim": {"lr": 10**400}}, "optim.lr must be a number within"),
        ({"train": {"epochs": 16**4000}}, "train.epochs must be an integer within"),
        ({"model": {"name": 16**4000}}, "model.name must be a string, got an int"),
        ({"optim": {"name": 16**4000}}, "optim.name must be one of 'sgd', 'adamw', got an int"),
        ({"teacher": {"name": "resnet8"}, "method": {"name": "kd", 1: 2}}, "unknown config key 'method.1'"),
        ({"teacher": {"name": "resnet8"}, "method": {"name": "kd", True: 2}}, "unknown config key 'method.True'"),
        ({"optim": {"lr\nrate": 1}}, r"unknown config key 'optim.lr\nrate'"),
        ({"model": {"name": "resnet8\nx"}}, r"unknown model 'resnet8\nx'"),
        ({"teacher": {"name": "resnet8"}, "schedule": {"warmup_epochs": math.inf}}, "schedule.warmup_epochs must"),
        ({"teacher": {"name": "resnet8"}, "schedule": {"min_lr": math.inf}}, "schedule.min_lr must"),
    ],
)
def test_found_inputs_are_one_line_config_errors(data, fragment):
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict(data))
    assert fragment in _check_error(err.value)


@pytest.mark.parametrize("override", ["model.name=2001-13-45", "data.root=" + "[" * 1000])
def test_overrides_yaml_cannot_parse_stay_strings(override):
    key, raw = override.split("=", 1)
    cfg = load_config(None, [override])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == raw

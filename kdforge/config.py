"""Typed run configuration: dataclass schemas, YAML loading, dotted overrides, validation and dumping.

Python is the source of truth: the dataclasses below define every key, its type and its default; a YAML file and
the CLI's ``key=value`` overrides only change values. Method parameters are not listed here: they are the typed
keyword arguments of the method's constructor, read through ``inspect``, so adding a method never touches this file.
Unknown keys and wrong types fail with one line that names the key and the closest valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kdforge.errors import ConfigError
from kdforge.registry import close_matches

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """A network: a registry name, its class count and optional weights.

    ``checkpoint`` is a weight file or a run directory (its ``model.pt``/``student.pt`` is used) holding the whole
    network. ``pretrained`` (tasks that put their own head on a zoo backbone: hashing) is the same for the backbone
    alone, as the zoo classifier it is (e.g. a ``kdforge train`` run of that model on ImageNet); the task drops the
    classifier and adds its head.
    """

    name: str = "resnet8"
    num_classes: int | None = None
    checkpoint: str | None = None
    pretrained: str | None = None


@dataclass
class DataConfig:
    """Dataset and batching; see ``kdforge.data.build_data`` for the meaning of each key."""

    name: str = "embedded"
    root: str | None = None
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 4
    image_size: int | None = None
    augment: bool = True
    train_subset: int | None = None
    test_subset: int | None = None
    views: Literal["none", "jda"] = "none"
    jda_p: float = 0.3
    jda_ops: list[str] | None = None
    # Image folders: an undecodable image either stops the run naming the file ("fail") or is dropped from its
    # batch and counted in metrics.jsonl as skipped_images ("skip").
    bad_images: Literal["fail", "skip"] = "fail"
    # K > 0: every training sample gets K fixed crop/flip views and each epoch shows one of them, so a frozen
    # teacher's logits can be cached exactly (train.teacher_cache). Needs augment=true, views=none, an in-memory set.
    replay_views: int = 0


@dataclass
class OptimConfig:
    """Optimizer. ``lr`` is the student's; methods that fine-tune a teacher scale it for their own group."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    # Weight decay on BN parameters and biases is the literature's default (RepDistiller, mdistiller), so it stays on.
    decay_norm_and_bias: bool = True


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped per iteration; warm-up is linear from ``warmup_start`` × lr."""

    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    """The loop: length, precision, devices, checkpoints and logging."""

    epochs: int = 240
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"
    channels_last: bool = True
    compile: bool = False
    grad_clip: float | None = None
    eval_every: int = 1
    log_every: int = 25
    # Also write last.pt every N optimizer steps inside an epoch (0: only at epoch ends), so a killed run loses at
    # most N steps; --resume continues from that batch with the same data order and random state.
    checkpoint_every: int = 0
    # A step with a non-finite loss or gradient: "stop" the run (checked at the log points, no per-step host sync)
    # or "skip" it and count it in metrics.jsonl (decided on the device, no host read; one copy of the parameters and
    # optimizer state per step; parameters, optimizer state and buffers stay as before the step).
    nonfinite: Literal["stop", "skip"] = "stop"
    progress: bool = True
    deterministic: bool = False
    # Per-epoch scalars also to <run dir>/tensorboard/ (needs the extra: pip install 'kdforge[tensorboard]').
    tensorboard: bool = False
    # Micro-batches per optimizer step: gradients of grad_accum batches are averaged before one update (under DDP
    # the first grad_accum - 1 skip the all-reduce). The effective batch is world_size x batch_size x grad_accum.
    grad_accum: int = 1
    # Distributed runs (torchrun): convert the student's BatchNorm to SyncBatchNorm (CUDA only), and how long a
    # collective may wait for a silent peer before the run fails instead of hanging.
    sync_bn: bool = False
    dist_timeout_s: float = 600.0
    # Teacher-output reuse: "auto" caches the frozen teacher's logits per sample when every epoch shows the teacher
    # the same input for that sample (see docs/PERFORMANCE.md), "on" insists (an error says why it can't), "off".
    teacher_cache: Literal["auto", "on", "off"] = "auto"
    #: fold the frozen teacher's conv+BN pairs where exact (kdforge/engine/teacher_fold.py): ``auto`` where the
    #: method allows, ``on`` insists, ``off`` (default) keeps the teacher as loaded, so results stay bit-identical to
    #: runs made before folding existed (folded logits differ by ~2e-6 relative)
    fold_teacher: Literal["auto", "on", "off"] = "off"


@dataclass
class MethodConfig:
    """The distillation method: its registry name plus the typed keyword arguments of its constructor."""

    name: str = "kd"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """What the network is trained to do: a task's registry name plus the typed keyword arguments of its
    constructor (``kdforge.tasks``), like a method's."""

    name: str = "classification"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """Everything one run needs. ``model`` is the network being trained (the student when distilling)."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------------------
# Type checking and coercion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ``ConfigError`` naming ``key``.

    Accepted conversions are the lossless ones a YAML user means: an integer where a float is expected, a string
    like ``1e-3`` (which YAML 1.1 reads as a string) where a float is expected, a list where a tuple is expected.
    """
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise _type_error(value, tp, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hints = close_matches(value, [str(c) for c in choices]) if isinstance(value, str) else []
        hint = f" (did you mean {hints[0]!r}?)" if hints else ""
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {_show(value)}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} entries, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        elem = args[0] if args else Any
        items = [coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(value, tp, key)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, key)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML reads integers of any size (0x... of thousands of digits); past 64 bits none is meaningful, and
            # one past Python's 4300-digit limit would make every message that prints it raise ValueError.
            if not -(2**63) <= value < 2**63:
                raise ConfigError(f"{key} must be an integer within 64 bits, got one of {value.bit_length()} bits")
            return value
        raise _type_error(value, tp, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer past the float range (about 1.8e308)
                raise ConfigError(
                    f"{key} must be a number within ±1.8e308, got an integer of {value.bit_length()} bits"
                ) from None
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(value, tp, key)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise _type_error(value, tp, key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(value, tp, key)


def _type_error(value: Any, tp: Any, key: str) -> ConfigError:
    return ConfigError(f"{key} must be {_type_name(tp)}, got {_show(value)} ({type(value).__name__})")


def _show(value: Any) -> str:
    """``repr(value)`` for an error message; YAML can hold values whose repr raises."""
    try:
        return repr(value)
    except (ValueError, RecursionError):  # an int past Python's 4300-digit limit (YAML hex), very deep nesting
        return f"an {type(value).__name__}" if isinstance(value, int) else f"a {type(value).__name__}"


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    full = repr(f"{prefix}{key}")  # quoted; a line break in a YAML key shows as \n and the message stays one line
    hints = close_matches(key, valid)
    if hints:
        hint = "closest valid keys: " + ", ".join(f"{prefix}{h}" for h in hints)
    else:
        hint = "valid keys: " + ", ".join(f"{prefix}{v}" for v in valid)
    return ConfigError(f"unknown config key {full}; {hint}")


def _dataclass_from_dict(cls: type, data: Any, prefix: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        tp = hints[key]
        sub = _dataclass_type(tp)
        if sub is not None:
            # null only where the section may be absent (teacher); `model: null` fails here, not in validate.
            optional = value is None and sub is not tp
            values[key] = None if optional else _dataclass_from_dict(sub, value, f"{prefix}{key}.")
        else:
            values[key] = coerce(value, tp, f"{prefix}{key}")
    return cls(**values)


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    if typing.get_origin(tp) in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _named_from_dict(data: Any, cls: type, section: str, example: str) -> Any:
    """Build a ``{name, params}`` section (method, task) from ``{name: ..., <param>: ...}`` as written in YAML."""
    if isinstance(data, cls):
        return data
    if isinstance(data, str):
        return cls(name=data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section} must be a mapping like {example}, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("name", cls.name)
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name must be a string, got {name!r}")
    return cls(name=name, params=data)


def method_from_dict(data: Any) -> MethodConfig:
    """Build a ``MethodConfig`` from ``{name: ..., <param>: ...}`` (a flat mapping, as written in YAML)."""
    return _named_from_dict(data, MethodConfig, "method", "{name: kd, temperature: 4}")


def task_from_dict(data: Any) -> TaskConfig:
    """Build a ``TaskConfig`` from ``{name: ..., <param>: ...}`` (a flat mapping, as written in YAML)."""
    return _named_from_dict(data, TaskConfig, "task", "{name: segmentation, ignore_index: 255}")


def config_from_dict(data: Any) -> RunConfig:
    """Build and type-check a ``RunConfig`` from nested mappings; method parameters are checked by ``validate``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(data).__name__}")
    data = dict(data)
    method = method_from_dict(data.pop("method", {}))
    task = task_from_dict(data.pop("task", {}) or {})
    cfg = _dataclass_from_dict(RunConfig, data, "")
    cfg.method = method
    cfg.task = task
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain nested dicts (tuples as lists), with the method flattened as in YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    out = {
        f.name: plain(dataclasses.asdict(getattr(cfg, f.name))) if getattr(cfg, f.name) is not None else None
        for f in dataclasses.fields(cfg)
        if f.name not in ("method", "task")
    }
    out["method"] = {"name": cfg.method.name, **plain(cfg.method.params)}
    order = ["model", "teacher", "method", "data", "optim", "schedule", "train"]
    ordered = {k: out[k] for k in order}
    if cfg.task.name != TaskConfig.name or cfg.task.params:
        # Classification configs stay as they were written before tasks existed; any other task leads the file.
        ordered = {"task": {"name": cfg.task.name, **plain(cfg.task.params)}, **ordered}
    return ordered


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping giving one key twice is an error instead of the later value
    silently winning (two ``method:`` blocks in one file would otherwise run only the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise ConfigError(
                    f"key {_show(key)} is given twice, at lines {first} and {line}; keep one of them "
                    "(the later one would silently win)"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping; one-line ``ConfigError`` when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        # The copy makes a tree of the document: an alias inside its own anchor (`a: &x [*x]`) fails here, not
        # later in the merge.
        data = _deep_copy(yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader))
    except ConfigError as err:  # a key given twice
        raise ConfigError(f"{path}: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; pass a YAML config to --config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {problem}{where}; fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply or has an alias that contains itself; fix the YAML") from None
    except ValueError as err:  # PyYAML's constructors: a date like 2001-13-45, an int past 4300 digits
        raise ConfigError(f"{path}: {err}; fix the YAML value") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path} must hold a mapping of keys to values (like 'train: {{epochs: 3}}'), got {type(data).__name__}"
        )
    return dict(data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into the key path and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write it like optim.lr=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: PyYAML's date/int constructors
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested mapping (a copy); types are checked later."""
    out = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursively for nested mappings."""
    out = _deep_copy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = _deep_copy(value)
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, defaults: Mapping[str, Any] | None = None
) -> RunConfig:
    """Defaults, then the YAML file, then the overrides; returns the type-checked ``RunConfig``."""
    data = dict(defaults or {})
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data)


# ----------------------------------------------------------------------------------------------------------------
# Value checks that types alone cannot express.


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_values(cfg: RunConfig) -> RunConfig:
    """Check the values and combinations that types alone cannot express (ranges, orderings); returns ``cfg``.

    Names (models, methods, datasets) and method parameters need the registries and are checked by
    :func:`kdforge.validation.validate`, which calls this.
    """
    t, o, s, d = cfg.train, cfg.optim, cfg.schedule, cfg.data
    _require(t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}")
    _require(t.eval_every >= 1, f"train.eval_every must be at least 1, got {t.eval_every}")
    _require(t.log_every >= 1, f"train.log_every must be at least 1, got {t.log_every}")
    _require(
        t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (0 = epoch ends only), got {t.checkpoint_every}"
    )
    _require(t.grad_accum >= 1, f"train.grad_accum must be at least 1, got {t.grad_accum}")
    _require(
        math.isfinite(t.dist_timeout_s) and t.dist_timeout_s > 0,
        f"train.dist_timeout_s must be a positive number of seconds, got {t.dist_timeout_s}",
    )
    _require(t.grad_clip is None or t.grad_clip > 0, f"train.grad_clip must be positive or null, got {t.grad_clip}")
    _require(math.isfinite(o.lr) and 0 < o.lr <= 10, f"optim.lr must be in (0, 10], got {o.lr}")
    _require(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _require(0 <= o.weight_decay < 1, f"optim.weight_decay must be in [0, 1), got {o.weight_decay}")
    _require(all(0 <= b < 1 for b in o.betas), f"optim.betas must each be in [0, 1), got {list(o.betas)}")
    _require(not o.nesterov or o.momentum > 0, "optim.nesterov needs optim.momentum > 0")
    _require(0 < s.gamma <= 1, f"schedule.gamma must be in (0, 1], got {s.gamma}")
    # inf passes a plain >= 0 yet overflows round(warmup_epochs * steps) when the scheduler is built.
    _require(
        math.isfinite(s.warmup_epochs) and s.warmup_epochs >= 0,
        f"schedule.warmup_epochs must be a finite number >= 0, got {s.warmup_epochs}",
    )
    _require(0 < s.warmup_start <= 1, f"schedule.warmup_start must be in (0, 1], got {s.warmup_start}")
    _require(math.isfinite(s.min_lr) and s.min_lr >= 0, f"schedule.min_lr must be a finite number >= 0, got {s.min_lr}")
    _require(
        list(s.milestones) == sorted(s.milestones) and all(m > 0 for m in s.milestones),
        f"schedule.milestones must be increasing positive epochs, got {list(s.milestones)}",
    )
    _require(d.batch_size >= 1, f"data.batch_size must be at least 1, got {d.batch_size}")
    _require(d.eval_batch_size >= 1, f"data.eval_batch_size must be at least 1, got {d.eval_batch_size}")
    _require(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    for key in ("train_subset", "test_subset", "image_size"):
        value = getattr(d, key)
        _require(value is None or value >= 1, f"data.{key} must be positive or null, got {value}")
    _require(d.replay_views >= 0, f"data.replay_views must be >= 0 (0 = fresh crops every epoch), got {d.replay_views}")
    if d.replay_views:
        _require(d.augment, "data.replay_views replays crop/flip views but data.augment=false: set data.replay_views=0")
        _require(d.views == "none", f"data.replay_views cannot replay data.views={d.views}: set data.replay_views=0")
    for key, mc in (("model", cfg.model), ("teacher", cfg.teacher)):
        if mc is not None and mc.num_classes is not None:
            _require(mc.num_classes >= 1, f"{key}.num_classes must be at least 1, got {mc.num_classes}")
    return cfg

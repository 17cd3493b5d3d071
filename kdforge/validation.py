"""Validation of a run config against the registries: the one check a run gets before anything is built.

:mod:`kdforge.config` knows the schema and checks values; what needs the registries (model, method and dataset
names, a method's parameters and what it needs: a teacher, dual views) is checked here, so the config module stays
below the methods, models and data it names.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from kdforge.config import RunConfig, _dataclass_type, _require, check_values
from kdforge.data import DATASETS, list_datasets
from kdforge.data.jda import JDAPolicy
from kdforge.engine.logging import TENSORBOARD_HINT, tensorboard_available
from kdforge.errors import ConfigError
from kdforge.methods import METHODS
from kdforge.methods.params import check_method_params, method_signature
from kdforge.registry import TASKS, close_matches


def validate(cfg: RunConfig, command: Literal["train", "distill"] = "distill") -> RunConfig:
    """Check names, method parameters (coerced in place), combinations and values; returns ``cfg``.

    Raises:
        ConfigError: one line naming the key, what is wrong and how to fix it.
    """

    def known(name: str, names: list[str], what: str, key: str) -> None:
        if name not in names:
            hints = close_matches(name, names)
            hint = f"did you mean {', '.join(repr(h) for h in hints)}? " if hints else ""
            raise ConfigError(f"{key}: unknown {what} {name!r}; {hint}run `kdforge {what}s` to list them")

    known(cfg.task.name, TASKS.names(), "task", "task.name")
    task_cls = TASKS.get(cfg.task.name)
    cfg.task.params = check_method_params(task_cls, cfg.task.params, prefix="task.")
    models = task_cls.model_names()
    known(cfg.model.name, models, "model", "model.name")
    known(cfg.method.name, METHODS.names(), "method", "method.name")
    known(cfg.data.name, list_datasets(), "dataset", "data.name")
    method_cls = METHODS.get(cfg.method.name)
    cfg.method.params = check_method_params(method_cls, cfg.method.params)
    _require(
        cfg.task.name in method_cls.tasks or "*" in method_cls.tasks,
        f"method '{cfg.method.name}' distils {', '.join(method_cls.tasks)}, not {cfg.task.name}; "
        "`kdforge methods` lists the methods of each task",
    )
    data_task = DATASETS.meta(cfg.data.name).get("task", "classification")
    _require(
        data_task == cfg.task.name,
        f"dataset '{cfg.data.name}' is a {data_task} dataset but task.name is {cfg.task.name}; "
        f"set task.name={data_task} or choose a {cfg.task.name} dataset (`kdforge datasets`)",
    )

    _require(
        cfg.model.pretrained is None or task_cls.takes_pretrained_backbone,
        f"model.pretrained is for tasks that put their head on a zoo backbone (hashing), not task {cfg.task.name}; "
        "give whole-network weights as model.checkpoint",
    )

    if command == "train":
        _require(
            not getattr(method_cls, "needs_teacher", True),
            f"`kdforge train` trains without a teacher (methods vanilla, purf, dml); use `kdforge distill` for "
            f"method '{cfg.method.name}'",
        )
    if getattr(method_cls, "needs_teacher", False):
        _require(
            cfg.teacher is not None and bool(cfg.teacher.name),
            f"method '{cfg.method.name}' needs a teacher: set teacher.name=... and teacher.checkpoint=...",
        )
    if cfg.teacher is not None:
        known(cfg.teacher.name, models, "model", "teacher.name")
        _require(
            getattr(method_cls, "needs_teacher", True),
            f"method '{cfg.method.name}' trains without a pretrained teacher; remove the teacher section "
            f"(and teacher.* overrides) from the config",
        )
    needs_views = getattr(method_cls, "needs_views", False)
    _require(
        not needs_views or cfg.data.views != "none",
        f"method '{cfg.method.name}' needs dual-view batches: set data.views=jda",
    )
    _require(
        needs_views or cfg.data.views == "none",
        f"data.views={cfg.data.views} only feeds dual-view methods (ccd, kd_jda); "
        f"method '{cfg.method.name}' would ignore the second view, so set data.views=none",
    )
    _require(0.0 <= cfg.data.jda_p <= 1.0, f"data.jda_p must be in [0, 1], got {cfg.data.jda_p}")
    if cfg.data.bad_images != "fail":
        _require(
            DATASETS.meta(cfg.data.name).get("kind") == "folder",
            f"data.bad_images applies to image folders (folder, imagenet), not '{cfg.data.name}': remove it",
        )
    if cfg.data.jda_ops is not None:
        try:
            JDAPolicy.parse(cfg.data.jda_ops, cfg.data.jda_p)
        except ValueError as err:
            raise ConfigError(f"data.jda_ops: {err}") from None
    check_values(cfg)
    if cfg.train.tensorboard:
        _require(
            tensorboard_available(),
            f"train.tensorboard=true needs the tensorboard package: {TENSORBOARD_HINT}",
        )
    if cfg.data.replay_views:
        _require(
            DATASETS.meta(cfg.data.name).get("kind") != "folder",
            "data.replay_views needs an in-memory dataset (embedded, cifar10, cifar100, cifar10_jpeg), "
            f"not '{cfg.data.name}'",
        )
    return cfg


def flat_keys(cfg: RunConfig | None = None) -> list[str]:
    """Every settable dotted key of the schema (method parameters of the chosen method included)."""
    cfg = cfg or RunConfig()
    keys = []
    for f in dataclasses.fields(RunConfig):
        if f.name in ("method", "task"):
            continue
        sub = _dataclass_type(typing.get_type_hints(RunConfig)[f.name])
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)]
    if cfg.method.name in METHODS:
        keys += [f"method.{k}" for k in method_signature(METHODS.get(cfg.method.name))]
    if cfg.task.name in TASKS:
        keys += [f"task.{k}" for k in method_signature(TASKS.get(cfg.task.name))]
    return ["task.name", "method.name", *keys]


__all__ = ["flat_keys", "validate"]

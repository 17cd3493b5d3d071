"""Distillation methods: one file each, registered in ``METHODS`` at the definition."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from torch import nn

from kdforge.errors import ConfigError
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.methods.params import CONTEXT_ARGS, check_method_params
from kdforge.registry import METHODS
from kdforge.tasks.base import Task

# Every module of this package registers its method when imported; importing them all here means a new method is
# one new file, with no list to keep in sync.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def list_methods() -> list[dict[str, Any]]:
    """One row per method: name, family, paper, whether it is exact or reconstructed, one-line summary."""
    rows = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        rows.append(
            {
                "name": name,
                "family": cls.family,
                "paper": cls.paper,
                "status": "exact" if cls.exact else "reconstructed",
                "summary": cls.summary,
            }
        )
    return rows


def create_method(
    name: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    *,
    context: dict[str, Any] | None = None,
    task: Task | None = None,
    **params: Any,
) -> Method:
    """Build the method ``name`` around ``student`` (and ``teacher``).

    Args:
        name: registry name (``kdforge methods`` lists them).
        student: the network to train.
        teacher: the pretrained teacher; required by methods with ``needs_teacher``.
        context: run facts a method may ask for by argument name (``num_classes``, ``num_train``, ``epochs``,
            ``steps_per_epoch``); the engine fills it.
        task: what the student is trained to do (default: classification with the student's classes); the method
            must declare it in ``Method.tasks``.
        **params: the method's own typed keyword arguments (type-checked like a config).
    """
    cls = METHODS.get(name)
    params = check_method_params(cls, params)
    if task is not None and task.name not in cls.tasks and "*" not in cls.tasks:
        raise ConfigError(
            f"method '{name}' distils {', '.join(cls.tasks)}, not {task.name}; `kdforge methods` lists the methods "
            f"of each task"
        )
    if cls.needs_teacher and teacher is None:
        raise ConfigError(f"method '{name}' needs a teacher: set teacher.name and teacher.checkpoint")
    if not cls.needs_teacher and teacher is not None:
        raise ConfigError(f"method '{name}' trains without a teacher; remove the teacher from the config")
    s_classes, t_classes = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if teacher is not None and s_classes is not None and t_classes is not None and s_classes != t_classes:
        raise ConfigError(
            f"the teacher predicts {t_classes} classes but the student {s_classes}; "
            "distillation needs the same classes (check teacher.num_classes / the dataset)"
        )
    return instantiate_method(name, student, teacher, context=context, params=params, task=task)


def instantiate_method(
    name: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    *,
    context: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    task: Task | None = None,
) -> Method:
    """Construct method ``name`` from parameters already checked (by :func:`create_method` or
    :func:`kdforge.validation.validate`, which coerces ``cfg.method.params`` in place); no check is repeated.

    A method whose constructor takes ``task`` receives it there (to size adapters, share the task's assignment);
    every method gets it as ``method.task``."""
    cls = METHODS.get(name)
    sig = inspect.signature(cls.__init__).parameters
    ctx = {k: v for k, v in (context or {}).items() if k in sig and k in CONTEXT_ARGS}
    kwargs: dict[str, Any] = {"student": student, **ctx, **(params or {})}
    if "teacher" in sig:
        kwargs["teacher"] = teacher
    if "task" in sig and task is not None:
        kwargs["task"] = task
    try:
        method = cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"method '{name}': {err}") from None
    if task is not None:
        method.task = task
    return method


__all__ = ["METHODS", "Method", "Progress", "StepOutput", "create_method", "instantiate_method", "list_methods"]

"""Evaluation: a network over a split, scored by its task's :class:`~kdforge.tasks.base.Evaluator`, reduced over
ranks.

The loop calls :func:`evaluate`; what is counted (top-1, a confusion matrix, boxes for COCO AP, PSNR sums) is the
task's business: :meth:`~kdforge.tasks.base.Task.predict` post-processes the outputs and the evaluator accumulates
and reduces them, so the engine never asks which task it evaluates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.collectives import CollectiveReducer
from kdforge.data.batch import Batch
from kdforge.engine.env import autocast, eval_mode, resolve_precision
from kdforge.errors import ConfigError
from kdforge.methods.base import Method
from kdforge.tasks.base import EVALUATED_SPLIT, Evaluator, Task
from kdforge.tasks.classification import ClassificationEvaluator, ClassificationTask


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[Tensor], Tensor],
    loader: Iterable[Batch],
    *,
    device: torch.device | str | None = None,
    precision: str | torch.dtype = "fp32",
    task: Task | None = None,
) -> dict[str, float]:
    """The task's metrics of ``model`` over ``loader`` (classification: top-1/top-5 accuracy in % and mean
    cross-entropy).

    A :class:`Method` is evaluated through its ``forward_eval`` (the student) and its own task. A loader sharded over
    the processes of a distributed run (``world_size`` > 1) has its evaluator reduced over ranks, so every rank
    returns the metrics of the whole set (those that need gathered data: rank 0).

    An evaluator that scores the split against other splits (:attr:`Evaluator.extra_splits`, e.g. a retrieval
    database) gets them from ``loader.extra_splits`` (name → loader), encoded by the same network; those named in
    :attr:`Evaluator.teacher_splits` are also encoded by a method's frozen teacher and fed as ``teacher_<name>``.
    """
    module = model if isinstance(model, nn.Module) else None
    fn = model.forward_eval if isinstance(model, Method) else model
    if device is None:
        param = next(module.parameters(), None) if module is not None else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = precision if isinstance(precision, torch.dtype) else resolve_precision(precision, device)
    if task is None:
        task = model.task if isinstance(model, Method) else ClassificationTask()
    evaluator = task.evaluator()
    with eval_mode(module) if module is not None else contextlib.nullcontext():
        _feed(fn, loader, task, evaluator, device, dtype, EVALUATED_SPLIT)
        if evaluator.extra_splits:
            splits = _extra_splits(loader, evaluator, task)
            for name in evaluator.extra_splits:
                _feed(fn, splits[name], task, evaluator, device, dtype, name)
            teacher = model.teacher if isinstance(model, Method) else None
            if teacher is not None:
                with eval_mode(teacher):
                    for name in evaluator.teacher_splits:
                        _feed(teacher, splits[name], task, evaluator, device, dtype, f"teacher_{name}")
    reducer: Any = CollectiveReducer() if getattr(loader, "world_size", 1) > 1 else None
    return evaluator.compute(reducer)


def _feed(
    fn: Callable[[Tensor], Any],
    loader: Iterable[Batch],
    task: Task,
    evaluator: Evaluator,
    device: torch.device,
    dtype: torch.dtype,
    split: str,
) -> None:
    """Every batch of ``loader`` through ``fn`` and the task's post-processing into ``evaluator`` as ``split``."""
    for batch in loader:
        batch = batch.to(device)
        with autocast(device, dtype):
            outputs = fn(batch.input)
        evaluator.update_batch(task.predict(outputs), batch, split)


def _extra_splits(loader: Iterable[Batch], evaluator: Evaluator, task: Task) -> Mapping[str, Iterable[Batch]]:
    """The loaders of the splits ``evaluator`` needs beside the evaluated one, from ``loader.extra_splits``."""
    splits: Mapping[str, Iterable[Batch]] = getattr(loader, "extra_splits", None) or {}
    missing = [name for name in evaluator.extra_splits if name not in splits]
    if missing:
        raise ConfigError(
            f"the {task.name} evaluator scores the test split against the {missing} split(s), which this test loader "
            f"does not provide (it has {sorted(splits)}); use a dataset registered for task '{task.name}' "
            "(kdforge datasets), whose test loader carries them as extra_splits"
        )
    return splits


@torch.no_grad()
def collect_logits(
    model: nn.Module, loader: Iterable[Batch], *, device: torch.device | str, precision: str | torch.dtype = "fp32"
) -> tuple[Tensor, Tensor]:
    """Every test logit and label of a classifier over ``loader`` (one process), in loader order, on the CPU:
    ``([N, C] float32, [N] int64)`` for the reports that need more than counts (per-class scores, ROC curves)."""
    device = torch.device(device)
    dtype = precision if isinstance(precision, torch.dtype) else resolve_precision(precision, device)
    logits, targets = [], []
    with eval_mode(model):
        for batch in loader:
            batch = batch.to(device)
            with autocast(device, dtype):
                out = model(batch.input)
            logits.append(out.float().cpu())
            targets.append(batch.target.cpu())
    return torch.cat(logits), torch.cat(targets)


__all__ = ["ClassificationEvaluator", "collect_logits", "evaluate"]

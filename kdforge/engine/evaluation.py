"""Evaluation: classification top-1/top-5 counted by an :class:`~kdforge.tasks.base.Evaluator`, reduced over ranks.

The loop calls :func:`evaluate`; the counting lives in :class:`ClassificationEvaluator`, which follows the task
layer's ``reset``/``update``/``compute(reducer)`` interface, so a task's own evaluator can take its place without
touching the loop's bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdforge.collectives import CollectiveReducer
from kdforge.data.batch import Batch
from kdforge.engine.env import autocast, eval_mode, resolve_precision
from kdforge.errors import KDForgeError
from kdforge.methods.base import Method
from kdforge.tasks.base import Evaluator, Reducer


class ClassificationEvaluator(Evaluator):
    """Top-1/top-5 accuracy (%) and mean cross-entropy over a split, from summed counts.

    Counts are summed, never per-batch means averaged, so the result is exact for any batch split; ``compute`` sums
    them over the processes through ``reducer`` (the shards of a distributed loader are disjoint and complete).

    Args:
        device: where the running counts live (the logits' device).
    """

    primary: ClassVar[str] = "top1"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        # correct@1, correct@5, loss sum, count; float64 so counts stay exact far past 2**24 samples.
        self.totals = torch.zeros(4, dtype=torch.float64, device=self.device)

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Add a batch: ``preds`` ``[B, C]`` logits (any float dtype), ``targets`` ``[B]`` class indices."""
        logits = preds.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == targets[:, None]
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        self.totals += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), loss, torch.tensor(len(targets))]).to(
            self.totals
        )

    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        totals = self.totals.clone()
        if reducer is not None:
            totals = reducer.sum(totals)
        c1, c5, loss_sum, n = totals.tolist()
        if n == 0:
            raise KDForgeError("evaluation data is empty")
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "count": int(n)}


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[Tensor], Tensor],
    loader: Iterable[Batch],
    *,
    device: torch.device | str | None = None,
    precision: str | torch.dtype = "fp32",
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``.

    A :class:`Method` is evaluated through its ``forward_eval`` (the student). A loader sharded over the processes
    of a distributed run (``world_size`` > 1) has its counts summed over ranks, so every rank returns the accuracy
    on the whole set.
    """
    module = model if isinstance(model, nn.Module) else None
    fn = model.forward_eval if isinstance(model, Method) else model
    if device is None:
        param = next(module.parameters(), None) if module is not None else None
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = precision if isinstance(precision, torch.dtype) else resolve_precision(precision, device)
    evaluator = ClassificationEvaluator(device)
    with eval_mode(module) if module is not None else contextlib.nullcontext():
        for batch in loader:
            batch = batch.to(device)
            with autocast(device, dtype):
                logits = fn(batch.input)
            evaluator.update(logits, batch.target)
    reducer: Any = CollectiveReducer() if getattr(loader, "world_size", 1) > 1 else None
    return evaluator.compute(reducer)


__all__ = ["ClassificationEvaluator", "evaluate"]

"""Image classification: labels in, logits out, top-1/top-5 from summed counts.

The task kdforge started with, moved onto the task layer without changing a number: its loss is the cross-entropy
every classification method already used, and its evaluator counts exactly what the engine counted before.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdforge.errors import KDForgeError
from kdforge.losses.logit import cross_entropy
from kdforge.models import create_model, list_models
from kdforge.registry import TASKS
from kdforge.tasks.base import Evaluator, Reducer, Task


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
        if self.totals.device != logits.device:
            self.totals = self.totals.to(logits.device)
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


@TASKS.register("classification")
class ClassificationTask(Task):
    """One label per image; the networks of the model zoo.

    Args:
        num_classes: the classifier width (the engine fills it from the dataset).
    """

    name: ClassVar[str] = "classification"
    summary_metrics: ClassVar[tuple[str, ...]] = ("top1", "top5")

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes

    @classmethod
    def model_names(cls) -> list[str]:
        return list_models()

    def build_model(self, arch: str, **kwargs: Any) -> nn.Module:
        return create_model(arch, num_classes=kwargs.get("num_classes", self.num_classes))

    def loss(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return {"ce": cross_entropy(outputs, targets)}

    def predict(self, outputs: Tensor) -> Tensor:
        return outputs

    def evaluator(self) -> ClassificationEvaluator:
        return ClassificationEvaluator()


__all__ = ["ClassificationEvaluator", "ClassificationTask"]

"""Semantic segmentation: per-pixel classification with an ignore index, scored by aAcc, mAcc and mIoU.

Targets are ``mask`` int64 ``[B, H, W]`` with class indices ``0..K-1`` and ``ignore_index`` (255) for pixels that
count nowhere (VOC object borders, Cityscapes void, augmentation padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import ConfigError
from kdforge.models.dense.segmentation import SEGMENTATION_MODELS, SegFeatures
from kdforge.registry import TASKS
from kdforge.tasks.base import Evaluator, LocalReducer, Reducer, Task


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion counts of one batch by ``bincount`` on the tensors' device.

    Pixels whose target is ``ignore_index`` (or outside ``0..K-1``) are left out; predictions must lie in
    ``0..K-1`` (an argmax does).

    Args:
        preds: ``[B, H, W]`` int64 predicted classes.
        targets: ``[B, H, W]`` int64 labels.
        num_classes: K.
        ignore_index: label value excluded from every count.

    Returns:
        ``[K, K]`` int64, rows = label, columns = prediction.
    """
    if preds.shape != targets.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and masks {tuple(targets.shape)} differ in shape")
    t = targets.reshape(-1).long()
    p = preds.reshape(-1).long()
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    # Invalid pixels are sent to an extra bin past K*K that is dropped, which keeps the shapes static (no
    # boolean indexing, so no device synchronisation).
    idx = torch.where(valid, t * num_classes + p, torch.full_like(t, num_classes * num_classes))
    counts = torch.bincount(idx, minlength=num_classes * num_classes + 1)
    return counts[: num_classes * num_classes].view(num_classes, num_classes)


def metrics_from_confusion(cm: Tensor, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """aAcc, mAcc, mIoU and per-class IoU/Acc (percent) of a whole-dataset confusion matrix, as mmseg's ``IoUMetric``.

    Checked against mmsegmentation ``mmseg/evaluation/metrics/iou_metric.py`` (commit
    01c96235453a5dff67473f782d01e9458f0b8a57): ``aAcc = Σ intersect / Σ label``, ``IoU_k = intersect_k / union_k``
    with ``union = pred + label − intersect``, ``Acc_k = intersect_k / label_k``; a 0/0 class is NaN and left out of
    the means by ``nanmean`` (for IoU: absent from both labels and predictions; for Acc: absent from the labels).
    mmseg rounds its summary to two decimals; these values are not rounded.

    Args:
        cm: ``[K, K]`` counts, rows = label, columns = prediction.
        class_names: K names for the per-class keys ``IoU.<name>``/``Acc.<name>`` (default: the indices).

    Returns:
        ``{"aAcc", "mAcc", "mIoU", "IoU.<name>"..., "Acc.<name>"...}`` in percent (per-class NaN where undefined).
    """
    cm = cm.double()
    inter = cm.diagonal()
    area_label = cm.sum(dim=1)
    area_pred = cm.sum(dim=0)
    union = area_pred + area_label - inter
    iou = inter / union  # 0/0 → NaN, as torch and mmseg divide
    acc = inter / area_label
    out = {
        "aAcc": (inter.sum() / area_label.sum()).item() * 100,
        "mAcc": torch.nanmean(acc).item() * 100,
        "mIoU": torch.nanmean(iou).item() * 100,
    }
    names = list(class_names) if class_names is not None else [str(k) for k in range(cm.shape[0])]
    for k, name in enumerate(names):
        out[f"IoU.{name}"] = iou[k].item() * 100
    for k, name in enumerate(names):
        out[f"Acc.{name}"] = acc[k].item() * 100
    return out


class SegmentationEvaluator(Evaluator):
    """Whole-split confusion matrix on the device; aAcc, mAcc, mIoU and per-class IoU/Acc at the end.

    The matrix is additive, so ``compute`` sums it over processes with ``reducer.sum``: the result equals one
    evaluator fed every batch, exactly (integer counts).

    Args:
        num_classes: K.
        ignore_index: label value excluded from every count.
        class_names: K names for the per-class keys.
    """

    primary: ClassVar[str] = "mIoU"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names for {num_classes} classes; give one name per class")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.confusion: Tensor | None = None

    def reset(self) -> None:
        self.confusion = None

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Args: ``preds`` ``[B, H, W]`` int64 (``SegmentationTask.predict``), ``targets`` ``[B, H, W]`` int64."""
        cm = confusion_matrix(preds, targets.to(preds.device), self.num_classes, self.ignore_index)
        self.confusion = cm if self.confusion is None else self.confusion + cm

    def state(self) -> Tensor:
        """This process's ``[K, K]`` int64 counts (zeros before any update)."""
        if self.confusion is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        return self.confusion

    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        cm = (reducer or LocalReducer()).sum(self.state())
        return metrics_from_confusion(cm, self.class_names)


def _logits_of(outputs: Tensor | SegFeatures) -> tuple[Tensor, Tensor | None]:
    if isinstance(outputs, SegFeatures):
        return outputs.logits, outputs.aux_logits
    return outputs, None


def masked_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = 255) -> Tensor:
    """Per-pixel cross-entropy averaged over the non-ignored pixels (0 when every pixel is ignored).

    mmseg's ``CrossEntropyLoss(avg_non_ignore=True)``; PyTorch's ``reduction="mean"`` would give NaN (0/0) on a
    batch that is all padding. Logits at another size than the mask are bilinearly resized to it first (mmseg's
    ``resize(seg_logits, size=label.shape[2:], mode="bilinear", align_corners=False)``).

    Args:
        logits: ``[B, K, h, w]``.
        targets: ``[B, H, W]`` int64 with ``ignore_index`` for excluded pixels.
        ignore_index: the excluded label.

    Returns:
        Scalar float32.
    """
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        per_pixel = F.cross_entropy(logits.float(), targets.long(), ignore_index=ignore_index, reduction="sum")
        count = (targets != ignore_index).sum().clamp(min=1)
        return per_pixel / count


@TASKS.register("segmentation")
class SegmentationTask(Task):
    """Semantic segmentation with K classes and an ignore index.

    Args:
        num_classes: K (11 for the synthetic CIFAR canvases, 21 for VOC, 19 for Cityscapes).
        ignore_index: label value excluded from the loss and the metrics.
        aux_weight: weight of the auxiliary head's cross-entropy (mmseg PSPNet: 0.4); used when the outputs carry
            ``aux_logits``.
        class_names: K names for the per-class metrics.
    """

    name: ClassVar[str] = "segmentation"
    summary_metrics: ClassVar[tuple[str, ...]] = ("mIoU", "aAcc", "mAcc")

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        aux_weight: float = 0.4,
        class_names: list[str] | None = None,
    ) -> None:
        if num_classes < 2:
            raise ConfigError(f"segmentation needs num_classes >= 2, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ConfigError(f"ignore_index {ignore_index} is a class index (num_classes={num_classes}); use 255")
        if aux_weight < 0:
            raise ConfigError(f"aux_weight must be >= 0, got {aux_weight}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.class_names = list(class_names) if class_names is not None else None

    @classmethod
    def model_names(cls) -> list[str]:
        return sorted(SEGMENTATION_MODELS)

    def build_model(self, arch: str, **kw: Any) -> nn.Module:
        """A network of :data:`SEGMENTATION_MODELS` with this task's ``num_classes``."""
        if arch not in SEGMENTATION_MODELS:
            raise ConfigError(f"unknown segmentation model {arch!r}; choose one of {sorted(SEGMENTATION_MODELS)}")
        kw.pop("num_classes", None)
        return SEGMENTATION_MODELS[arch](num_classes=self.num_classes, **kw)

    def train_outputs(self, model: nn.Module, x: Tensor) -> Tensor | SegFeatures:
        # The features carry the teacher's auxiliary logits, which the auxiliary loss needs.
        return model.forward_features(x) if hasattr(model, "forward_features") else model(x)

    def loss(self, outputs: Tensor | SegFeatures, targets: Tensor) -> dict[str, Tensor]:
        """The student's own loss: ``{"ce": ...}`` plus ``{"aux_ce": aux_weight · CE(aux)}`` when outputs have one.

        Args:
            outputs: logits ``[B, K, H, W]`` (``model(x)``) or :class:`SegFeatures` (``model.forward_features(x)``).
            targets: mask ``[B, H, W]`` int64.
        """
        logits, aux = _logits_of(outputs)
        parts = {"ce": masked_cross_entropy(logits, targets, self.ignore_index)}
        if aux is not None and self.aux_weight > 0:
            parts["aux_ce"] = self.aux_weight * masked_cross_entropy(aux, targets, self.ignore_index)
        return parts

    def predict(self, outputs: Tensor | SegFeatures) -> Tensor:
        """Class map ``[B, H, W]`` int64: the argmax over classes."""
        return _logits_of(outputs)[0].argmax(dim=1)

    def evaluator(self) -> SegmentationEvaluator:
        return SegmentationEvaluator(self.num_classes, self.ignore_index, self.class_names)


__all__ = [
    "SegmentationEvaluator",
    "SegmentationTask",
    "confusion_matrix",
    "masked_cross_entropy",
    "metrics_from_confusion",
]

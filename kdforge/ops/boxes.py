"""Axis-aligned box geometry in pure PyTorch: format conversions, IoU/GIoU and class-aware NMS.

Boxes are ``(x1, y1, x2, y2)`` in pixels unless a name says otherwise. Every function accepts arbitrary leading batch
dimensions. Degenerate boxes (zero width or height) are legal: their IoU with anything is 0, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: keeps a division finite when two boxes both have zero area (IoU of two points is defined as 0)
_EPS = 1e-9


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` corners ``(x1, y1, x2, y2)`` to ``(cx, cy, w, h)``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` ``(cx, cy, w, h)`` to corners ``(x1, y1, x2, y2)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` COCO ``(x, y, w, h)`` to corners ``(x1, y1, x2, y2)``."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` corners to COCO ``(x, y, w, h)``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy boxes to their areas ``[...]``; inverted boxes count as zero area."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of broadcastable ``[..., 4]`` box tensors."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def _enclosing_area(a: Tensor, b: Tensor) -> Tensor:
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU.

    Args:
        a: ``[..., N, 4]`` xyxy.
        b: ``[..., M, 4]`` xyxy (same leading dimensions as ``a``, or broadcastable).

    Returns:
        ``[..., N, M]``; 0 where the union is empty.
    """
    inter, union = _inter_union(a.unsqueeze(-2), b.unsqueeze(-3))
    return inter / union.clamp(min=_EPS)


def elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows: ``[..., 4]`` and ``[..., 4]`` to ``[...]``."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=_EPS)


def elementwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU (Rezatofighi et al., CVPR 2019) of matching rows: ``IoU - (C - U) / C``, in ``[-1, 1]``.

    ``C`` is the area of the smallest box enclosing both. Two coincident points give 0.

    Args:
        a: ``[..., 4]`` xyxy.
        b: ``[..., 4]`` xyxy.

    Returns:
        ``[...]``.
    """
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=_EPS)
    enclose = _enclosing_area(a, b)
    return iou - (enclose - union) / enclose.clamp(min=_EPS)


def box_giou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU: ``[..., N, 4]`` and ``[..., M, 4]`` to ``[..., N, M]`` (see :func:`elementwise_giou`)."""
    return elementwise_giou(a.unsqueeze(-2), b.unsqueeze(-3))


def _greedy_keep(order: Tensor, overlaps: Tensor) -> Tensor:
    """Greedy pass over boxes already sorted; ``overlaps[i, j]`` says whether sorted box ``i`` suppresses ``j``."""
    n = order.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=order.device)
    # The greedy pass is inherently sequential; each step is one masked row update on the device (no host sync).
    for i in range(n):
        keep[i + 1 :] &= ~(overlaps[i, i + 1 :] & keep[i])
    return order[keep]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression of one set of boxes.

    Visits boxes by score descending, ties by ascending index (a stable sort), and keeps a box unless a kept box
    overlaps it with IoU strictly above ``iou_threshold`` (torchvision's rule).

    Args:
        boxes: ``[N, 4]`` xyxy.
        scores: ``[N]``.
        iou_threshold: suppression threshold.

    Returns:
        int64 indices ``[K]`` of the kept boxes, by score descending (ties: smaller index first).
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    return _greedy_keep(order, box_iou(b, b) > iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware NMS: boxes of different classes never suppress each other.

    One greedy pass over all boxes with the suppression matrix masked to same-class pairs. This equals a per-class
    loop merged by score, and unlike the coordinate-offset trick it computes every IoU on the original coordinates,
    so no class is rounded differently from another.

    Args:
        boxes: ``[N, 4]`` xyxy.
        scores: ``[N]``.
        classes: int64 ``[N]``.
        iou_threshold: suppression threshold.

    Returns:
        int64 indices ``[K]`` by score descending, ties by index.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b, c = boxes[order], classes[order]
    same = c[:, None] == c[None, :]
    return _greedy_keep(order, (box_iou(b, b) > iou_threshold) & same)


__all__ = [
    "batched_nms",
    "box_area",
    "box_giou",
    "box_iou",
    "cxcywh_to_xyxy",
    "elementwise_giou",
    "elementwise_iou",
    "nms",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]

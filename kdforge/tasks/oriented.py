"""The oriented-object-detection task: oriented GFL detectors, ATSS assignment, QFL + DFL (sides and angle) + rotated
IoU loss, rotated NMS and DOTA-style mAP (docs/tasks/oriented.md).

Targets (padded so a batch stays on the device), a mapping with:

- ``rboxes``: float ``[B, M, 5]`` le90 ``(cx, cy, w, h, θ)`` pixels (:mod:`kdforge.ops.rotated`);
- ``labels``: int64 ``[B, M]``, ``-1`` on padding rows;
- optional ``difficult``: bool ``[B, M]`` (DOTA's flag: neither a hit nor a miss for the metric; trained on);
- optional ``image_id``: int64 ``[B]`` dataset indices (the metric then gives identical numbers for any split of the
  test set over processes; :class:`kdforge.tasks.rotated_metrics.OrientedEvaluator`).

Model outputs are :class:`kdforge.models.dense.oriented.OrientedGFLDetector`'s ``(cls_scores, bbox_preds,
angle_preds)`` per level, or its :class:`~kdforge.models.dense.oriented.OrientedFeatures`.

Box parametrisation (mmrotate ``distance2obb`` / rotated FCOS): a point ``p`` predicts its distances ``l, t, r, b``
to the four sides of the box measured in the box's own frame (``u`` along ``(cos θ, sin θ)``, ``v`` along
``(−sin θ, cos θ)``) and the angle θ; then ``w = l + r``, ``h = t + b`` and the centre is
``p + R(θ) · ((r − l) / 2, (b − t) / 2)``. The distances are in strides over ``reg_max + 1`` bins (GFL); the angle
distribution has ``angle_bins + 1`` bins at ``−π/2 + k·π/angle_bins`` (the le90 range), decoded as the expectation.
Decoded boxes are brought to le90 by :func:`~kdforge.ops.rotated.regularize_rboxes`. The angle bins do not wrap
around (θ = −π/2 and θ → π/2 are the same box at opposite ends of the distribution): the angle DFL pulls toward the
gt's le90 value while the rotated-IoU term is indifferent to the wrap.

Assignment: ATSS (:func:`kdforge.ops.assign.atss_assign`) against each gt's axis-aligned envelope, keeping the
positives whose point lies inside the rotated box itself (their side distances are then all positive, as rotated
FCOS/ATSS require).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError
from kdforge.losses.detection import integral
from kdforge.losses.oriented import ORIENTED_WEIGHTS, oriented_gfl_loss
from kdforge.models.dense.oriented import ORIENTED_MODELS, OrientedFeatures
from kdforge.ops.assign import atss_assign, grid_points
from kdforge.ops.boxes import box_iou
from kdforge.ops.rotated import rbox_iou, rbox_to_hbb, regularize_rboxes, rotated_nms
from kdforge.registry import TASKS
from kdforge.tasks.detection import Assignment, DetectionTask
from kdforge.tasks.rotated_metrics import OrientedEvaluator

OrientedOutputs = tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]] | OrientedFeatures


# ------------------------------------------------------------------------------------------------- geometry
def distance_to_rbox(points: Tensor, distances: Tensor, theta: Tensor) -> Tensor:
    """Rotated boxes from points, side distances and angles (mmrotate ``distance2obb``), regularised to le90.

    Args:
        points: ``[..., 2]`` ``(x, y)``.
        distances: ``[..., 4]`` ``(l, t, r, b)`` in the box frame, same unit as ``points``.
        theta: ``[...]`` angles (radians).

    Returns:
        ``[..., 5]`` le90 ``(cx, cy, w, h, θ)``.
    """
    l, t, r, b = distances.unbind(-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    du, dv = (r - l) / 2, (b - t) / 2
    cx = points[..., 0] + du * cos - dv * sin
    cy = points[..., 1] + du * sin + dv * cos
    return regularize_rboxes(torch.stack([cx, cy, l + r, t + b, theta], dim=-1))


def rbox_to_distance(points: Tensor, rboxes: Tensor) -> Tensor:
    """Side distances ``(l, t, r, b)`` ``[..., 4]`` of points ``[..., 2]`` to rotated boxes ``[..., 5]``, in the
    box frame (the inverse of :func:`distance_to_rbox` for the box's own angle; negative outside the box)."""
    d = points - rboxes[..., :2]
    cos, sin = torch.cos(rboxes[..., 4]), torch.sin(rboxes[..., 4])
    u = d[..., 0] * cos + d[..., 1] * sin
    v = -d[..., 0] * sin + d[..., 1] * cos
    hw, hh = rboxes[..., 2] / 2, rboxes[..., 3] / 2
    return torch.stack([hw + u, hh + v, hw - u, hh - v], dim=-1)


def angle_to_bins(theta: Tensor, angle_bins: int) -> Tensor:
    """le90 angle → position on the angle distribution's bins, ``(θ + π/2) · angle_bins / π`` in
    ``[0, angle_bins)``."""
    return (theta.float() + math.pi / 2) * (angle_bins / math.pi)


def angle_integral(angle_logits: Tensor) -> Tensor:
    """Expected angle of ``[..., angle_bins + 1]`` logits: ``Σ softmax · (−π/2 + k·π/angle_bins)``."""
    bins = angle_logits.shape[-1] - 1
    return integral(angle_logits) * (math.pi / bins) - math.pi / 2


def unrotated_boxes(rboxes: Tensor) -> Tensor:
    """``(cx ± w/2, cy ± h/2)`` of ``[..., 5]`` boxes, the angle dropped: how Rotated-LD's region functions
    (``get_ld_region``, ``get_im_region``) see a gt box."""
    half = rboxes[..., 2:4] / 2
    return torch.cat([rboxes[..., :2] - half, rboxes[..., :2] + half], dim=-1)


# ------------------------------------------------------------------------------------------------- outputs
@dataclass
class OrientedFlatOutputs:
    """Head outputs of all levels flattened to one point axis (levels in order, each row-major).

    Attributes:
        cls_logits: ``[B, N, C]``.
        edge_logits: ``[B, N, 4, reg_max + 1]`` (l, t, r, b).
        angle_logits: ``[B, N, angle_bins + 1]``.
        points: ``[N, 2]`` point centres in pixels.
        strides: ``[N]``.
        num_per_level: points per level.
    """

    cls_logits: Tensor
    edge_logits: Tensor
    angle_logits: Tensor
    points: Tensor
    strides: Tensor
    num_per_level: list[int]

    def decode(self) -> Tensor:
        """Rotated boxes ``[B, N, 5]`` le90 pixels (expected distances × stride, expected angle)."""
        dist = integral(self.edge_logits) * self.strides[None, :, None]
        return distance_to_rbox(self.points[None].expand_as(dist[..., :2]), dist, angle_integral(self.angle_logits))


class OrientedMAPEvaluator(OrientedEvaluator):
    """:class:`~kdforge.tasks.rotated_metrics.OrientedEvaluator` with the all-point ``mAP50`` as the tracked metric
    (the results tables' number; ``mAP50_07``, DOTA's official VOC07 11-point value, is reported beside it)."""

    primary: ClassVar[str] = "mAP50"


@TASKS.register("oriented_detection")
class OrientedDetectionTask(DetectionTask):
    """Arbitrary-oriented object detection with oriented GFL heads (module docstring).

    Args:
        num_classes: foreground classes.
        reg_max: side-distance distributions have ``reg_max + 1`` bins (GFL: 16).
        angle_bins: the angle distribution has ``angle_bins + 1`` bins over ``[−π/2, π/2]`` (16: 11.25° apart).
        strides, atss_topk, anchor_scale, score_threshold, pre_nms_topk, max_per_image: as
            :class:`~kdforge.tasks.detection.DetectionTask`.
        nms_threshold: rotated-NMS IoU threshold, per class (mmrotate's DOTA configs: 0.1).
        loss_weights: ``{"qfl", "iou", "dfl", "angle"}`` (1, 2, 0.25, 0.25).
    """

    name: ClassVar[str] = "oriented_detection"
    summary_metrics: ClassVar[tuple[str, ...]] = ("mAP50", "mAP50_07", "mAP75", "mAP50:95")

    def __init__(
        self,
        num_classes: int,
        reg_max: int = 16,
        angle_bins: int = 16,
        strides: tuple[int, ...] = (4, 8, 16),
        atss_topk: int = 9,
        anchor_scale: float = 4.0,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.1,
        pre_nms_topk: int = 1000,
        max_per_image: int = 100,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        if angle_bins < 1:
            raise ConfigError(f"oriented_detection needs angle_bins >= 1, got {angle_bins}")
        weights = dict(ORIENTED_WEIGHTS if loss_weights is None else loss_weights)
        if set(weights) != set(ORIENTED_WEIGHTS):
            raise ConfigError(
                f"task.loss_weights of oriented_detection needs exactly the keys {sorted(ORIENTED_WEIGHTS)}, got "
                f"{sorted(weights)}"
            )
        super().__init__(
            num_classes, reg_max, strides, atss_topk, anchor_scale, score_threshold, nms_threshold, pre_nms_topk,
            max_per_image, weights,
        )  # fmt: skip
        self.angle_bins = angle_bins

    @classmethod
    def model_names(cls) -> list[str]:
        return sorted(ORIENTED_MODELS)

    def build_model(self, arch: str, **kw: Any) -> nn.Module:
        """An oriented detector from ``ORIENTED_MODELS`` (``ogfl_resnet8``, ``ogfl_resnet20``, ``ogfl_resnet56``,
        ``ogfl_resnet8x4``, ``ogfl_resnet32x4``) with this task's classes, ``reg_max`` and ``angle_bins``."""
        if arch not in ORIENTED_MODELS:
            raise ConfigError(f"unknown oriented_detection model {arch!r}; choose from {sorted(ORIENTED_MODELS)}")
        kw.pop("num_classes", None)
        return ORIENTED_MODELS[arch](
            num_classes=self.num_classes, reg_max=self.reg_max, angle_bins=self.angle_bins, **kw
        )

    @staticmethod
    def head_outputs(outputs: Any) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:  # type: ignore[override]
        """``(cls_scores, bbox_preds, angle_preds)`` per level of a model's ``forward`` or ``forward_features``."""
        if isinstance(outputs, OrientedFeatures):
            return tuple(outputs.cls_scores), tuple(outputs.bbox_preds), tuple(outputs.angle_preds)
        if len(outputs) != 3:
            raise ValueError(
                f"oriented_detection reads (cls_scores, bbox_preds, angle_preds) per level, got {len(outputs)} "
                "groups of outputs; use an oriented detector (ogfl_*)"
            )
        return tuple(outputs[0]), tuple(outputs[1]), tuple(outputs[2])

    def image_size(self, outputs: Any) -> tuple[int, int]:
        cls_scores = self.head_outputs(outputs)[0]
        h, w = cls_scores[0].shape[-2:]
        return h * self.strides[0], w * self.strides[0]

    def flatten(self, outputs: Any) -> OrientedFlatOutputs:  # type: ignore[override]
        """Per-level outputs to :class:`OrientedFlatOutputs` with the point grid of those sizes."""
        cls_scores, bbox_preds, angle_preds = self.head_outputs(outputs)
        if not len(cls_scores) == len(bbox_preds) == len(angle_preds) == len(self.strides):
            raise ValueError(
                f"the task has {len(self.strides)} strides {self.strides} but the model gave {len(cls_scores)} "
                "levels; build the task with the model's strides"
            )
        b = cls_scores[0].shape[0]

        def cat(maps: tuple[Tensor, ...]) -> Tensor:
            return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)

        cls, edges, angles = cat(cls_scores), cat(bbox_preds), cat(angle_preds)
        points, strides, counts = grid_points(
            [(c.shape[-2], c.shape[-1]) for c in cls_scores], self.strides, device=cls.device
        )
        edges = edges.reshape(b, edges.shape[1], 4, self.reg_max + 1)
        return OrientedFlatOutputs(cls, edges, angles, points, strides, counts)

    def _padded(self, targets: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        rboxes, labels = targets["rboxes"].float(), targets["labels"]
        if labels.shape[1] == 0:  # a batch without any gt row: one padding row keeps the gathers defined
            rboxes = rboxes.new_zeros(labels.shape[0], 1, 5)
            labels = labels.new_full((labels.shape[0], 1), -1)
        return rboxes, labels

    def assign(self, outputs: Any, targets: Mapping[str, Tensor]) -> Assignment:  # type: ignore[override]
        """ATSS on the gts' envelopes, positives kept inside the rotated box (module docstring).

        Returns:
            An :class:`~kdforge.tasks.detection.Assignment` whose ``box_targets`` are ``[B, N, 5]`` rotated boxes
            and ``quality`` the rotated IoU of the detached decoded prediction with its gt.
        """
        flat = outputs if isinstance(outputs, OrientedFlatOutputs) else self.flatten(outputs)
        rboxes, labels = self._padded(targets)
        valid = labels >= 0
        gt_index, _ = atss_assign(
            flat.points, flat.strides, flat.num_per_level, rbox_to_hbb(rboxes), valid, self.atss_topk,
            self.anchor_scale,
        )  # fmt: skip
        idx = gt_index.clamp(min=0)
        box_t = torch.gather(rboxes, 1, idx[..., None].expand(-1, -1, 5))
        inside = rbox_to_distance(flat.points[None].expand(box_t.shape[0], -1, -1), box_t).amin(dim=-1) > 0
        pos = (gt_index >= 0) & inside
        box_t = box_t * pos[..., None]
        lab = torch.where(pos, torch.gather(labels, 1, idx), torch.full_like(idx, -1))
        quality = torch.zeros(pos.shape, device=pos.device)
        with torch.no_grad():
            quality[pos] = rbox_iou(flat.decode()[pos].detach(), box_t[pos])
        gt_index = torch.where(pos, gt_index, torch.full_like(gt_index, -1))
        return Assignment(labels=lab, box_targets=box_t, quality=quality, pos_mask=pos, gt_index=gt_index)

    def regression_targets(self, flat: OrientedFlatOutputs, a: Assignment) -> tuple[Tensor, Tensor]:
        """The positives' side distances in bins ``[P, 4]`` (clamped to ``[0, reg_max − 0.1]``, mmdet's
        ``bbox2distance``) and angle in bins ``[P]`` (clamped below ``angle_bins``)."""
        pos = a.pos_mask
        stride = flat.strides[None].expand_as(pos)[pos]
        points = flat.points[None].expand(pos.shape[0], -1, -1)[pos]
        box = a.box_targets[pos]
        edges = (rbox_to_distance(points, box) / stride[:, None]).clamp(min=0, max=self.reg_max - 0.1)
        angle = angle_to_bins(box[:, 4], self.angle_bins).clamp(min=0, max=self.angle_bins - 1e-3)
        return edges, angle

    def loss(self, outputs: Any, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """QFL + rotated IoU + DFL (sides) + DFL (angle), :func:`kdforge.losses.oriented.oriented_gfl_loss`."""
        flat = self.flatten(outputs)
        a = self.assign(flat, targets)
        pos = a.pos_mask
        stride = flat.strides[None].expand_as(pos)[pos]
        centres = flat.points[None].expand(pos.shape[0], -1, -1)[pos] / stride[:, None]
        edge_logits = flat.edge_logits[pos]
        angle_logits = flat.angle_logits[pos]
        # boxes in strides: the IoU is scale-free and the clipping works on numbers near 1
        pred = distance_to_rbox(centres, integral(edge_logits), angle_integral(angle_logits))
        box = a.box_targets[pos]
        target = torch.cat([box[:, :4] / stride[:, None], box[:, 4:]], dim=-1)
        edge_t, angle_t = self.regression_targets(flat, a)
        weight = flat.cls_logits.detach().sigmoid().amax(dim=-1)[pos]
        return oriented_gfl_loss(
            flat.cls_logits, a.labels, a.quality, pos, pred, target, edge_logits, edge_t, angle_logits, angle_t,
            weight, self.loss_weights,
        )  # fmt: skip

    def ld_region(self, flat: OrientedFlatOutputs, targets: Mapping[str, Tensor], alpha: float = 0.25) -> Tensor:
        """Rotated-LD's LD region ``[B, N]`` (``LDRotatedRetinaHead.get_ld_region``).

        Each point's anchor is the square of side ``anchor_scale × stride`` (the anchor-free stand-in for
        Rotated-RetinaNet's anchors), each gt the box ``(cx ± w/2, cy ± h/2)`` with its angle dropped, as the
        reference. With ``thr = mean + std`` (unbiased) of the IoUs of the ``atss_topk`` closest points per level,
        every point whose IoU with the gt is ``>= alpha · thr`` is in the gt's region (no upper bound, no
        centre-inside test: positives included); its value is its highest IoU over the gts whose region holds it.
        """
        rboxes, labels = self._padded(targets)
        valid = labels >= 0
        b, n = valid.shape[0], flat.points.shape[0]
        half = flat.strides[:, None] * (self.anchor_scale / 2)
        anchors = torch.cat((flat.points - half, flat.points + half), dim=-1).expand(b, n, 4)
        gt = unrotated_boxes(rboxes)
        ious = box_iou(anchors, gt)  # [B, N, M]
        dist = torch.cdist(flat.points.expand(b, n, 2), rboxes[..., :2])
        cand, start = [], 0
        for count in flat.num_per_level:
            near = torch.sort(dist[:, start : start + count], dim=1, stable=True).indices
            cand.append(near[:, : min(self.atss_topk, count)] + start)
            start += count
        cand_iou = torch.gather(ious, 1, torch.cat(cand, dim=1))
        thr = cand_iou.mean(dim=1, keepdim=True) + torch.nan_to_num(cand_iou.std(dim=1, keepdim=True), nan=0.0)
        inside = (ious >= alpha * thr) & valid[:, None, :]
        best = torch.where(inside, ious, torch.full_like(ious, -1.0)).amax(dim=-1)
        return best.clamp(min=0.0)

    def imitation_region(self, flat: OrientedFlatOutputs, targets: Mapping[str, Tensor]) -> Tensor:
        """Rotated-LD's ``finegrained`` imitation region, bool ``[B, N]`` (``get_im_region``): the points whose
        anchor (as :meth:`ld_region`) has IoU ``> 0.5 ×`` the largest anchor IoU of some gt of the image."""
        rboxes, labels = self._padded(targets)
        valid = labels >= 0
        b, n = valid.shape[0], flat.points.shape[0]
        half = flat.strides[:, None] * (self.anchor_scale / 2)
        anchors = torch.cat((flat.points - half, flat.points + half), dim=-1).expand(b, n, 4)
        ious = box_iou(anchors, unrotated_boxes(rboxes))
        top = ious.amax(dim=1, keepdim=True)  # [B, 1, M]
        return ((ious > 0.5 * top) & valid[:, None, :]).any(dim=-1)

    def valuable_region(self, outputs: Any, targets: Mapping[str, Tensor], alpha: float = 0.25) -> Tensor:
        """Oriented tasks use :meth:`ld_region` (Rotated-LD's region), not LD's valuable localisation region."""
        flat = outputs if isinstance(outputs, OrientedFlatOutputs) else self.flatten(outputs)
        return self.ld_region(flat, targets, alpha)

    @torch.no_grad()
    def predict(self, outputs: Any, image_size: tuple[int, int] | None = None) -> list[dict[str, Tensor]]:
        """Decodes rotated boxes, drops scores below ``score_threshold``, keeps the ``pre_nms_topk`` best (point,
        class) pairs, runs per-class rotated NMS and keeps ``max_per_image`` per image (as
        :meth:`DetectionTask.predict`; boxes are not clipped: a rotated box has no clipped rotated form).

        Returns:
            One ``{"rboxes": [K, 5], "scores": [K], "labels": [K]}`` per image, by score descending (the input of
            :class:`~kdforge.tasks.rotated_metrics.OrientedEvaluator`).
        """
        flat = self.flatten(outputs)
        boxes = flat.decode()
        scores = flat.cls_logits.float().sigmoid()
        c = scores.shape[-1]
        out = []
        for i in range(scores.shape[0]):
            s = scores[i].flatten()
            k = min(self.pre_nms_topk, s.numel())
            top_s, top_i = torch.sort(s, descending=True, stable=True)
            top_s, top_i = top_s[:k], top_i[:k]
            keep = top_s > self.score_threshold
            top_s, top_i = top_s[keep], top_i[keep]
            point, cls = top_i // c, top_i % c
            b = boxes[i][point]
            kept = rotated_nms(b, top_s, self.nms_threshold, labels=cls)[: self.max_per_image]
            out.append({"rboxes": b[kept], "scores": top_s[kept], "labels": cls[kept]})
        return out

    def evaluator(self) -> OrientedMAPEvaluator:  # type: ignore[override]
        return OrientedMAPEvaluator(self.num_classes)


__all__ = [
    "OrientedDetectionTask",
    "OrientedFlatOutputs",
    "OrientedMAPEvaluator",
    "angle_integral",
    "angle_to_bins",
    "distance_to_rbox",
    "rbox_to_distance",
    "unrotated_boxes",
]

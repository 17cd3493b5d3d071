"""The object-detection task: GFL detectors, ATSS assignment, GFL loss, post-processing and COCO box AP.

Targets (padded so a batch stays on the device), a mapping with:

- ``boxes``: float ``[B, M, 4]`` xyxy pixels;
- ``labels``: int64 ``[B, M]``, ``-1`` on padding rows;
- optional ``image_ids``: int64 ``[B]`` dataset indices (needed to score a split spread over processes);
- optional ``iscrowd``: bool ``[B, M]`` (crowd boxes are ignored by training and by the metric, as in COCO);
- optional ``areas``: float ``[B, M]`` area used for APs/APm/APl (COCO's ``area`` field; default the box area);
- optional ``scales``: float ``[B]`` the factor an image was resized by before the network (``coco_det``'s letterbox)
  and ``sizes``: int64 ``[B, 2]`` its original ``(H, W)``. With them the evaluator maps detections back to original
  pixels (divides by the scale, clips to the original size) and expects ``boxes`` in original pixels too, so AP is
  computed in original image coordinates.

Model outputs are :class:`kdforge.models.dense.detection.GFLDetector`'s ``(cls_scores, bbox_preds)`` per level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError
from kdforge.losses.detection import GFL_WEIGHTS, gfl_loss, integral
from kdforge.models.dense.detection import DETECTION_MODELS, DetectionFeatures
from kdforge.ops.assign import atss_assign, grid_points, vlr_region
from kdforge.ops.boxes import batched_nms, box_area, elementwise_iou
from kdforge.ops.coco_eval import ImageRecord, coco_box_metrics
from kdforge.registry import TASKS
from kdforge.tasks.base import Evaluator, Reducer, Task

#: the metrics of :func:`kdforge.ops.coco_eval.coco_box_metrics`, in a fixed order (for the cross-rank sum)
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

Outputs = tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | tuple[list[Tensor], list[Tensor]] | DetectionFeatures


@dataclass
class FlatOutputs:
    """Head outputs of all levels flattened to one point axis (levels in order, each row-major).

    Attributes:
        cls_logits: ``[B, N, C]``.
        edge_logits: ``[B, N, 4, reg_max + 1]`` (l, t, r, b).
        points: ``[N, 2]`` point centres ``(x, y)`` in pixels.
        strides: ``[N]`` stride of each point.
        num_per_level: points per level.
    """

    cls_logits: Tensor
    edge_logits: Tensor
    points: Tensor
    strides: Tensor
    num_per_level: list[int]

    def decode(self) -> Tensor:
        """Boxes ``[B, N, 4]`` xyxy pixels: point ∓ expected edge distance × stride (GFL's integral decoding)."""
        dist = integral(self.edge_logits) * self.strides[None, :, None]
        p = self.points[None]
        return torch.cat((p - dist[..., :2], p + dist[..., 2:]), dim=-1)


@dataclass
class Assignment:
    """Per-point training targets from ATSS, shared by the GFL loss and localisation distillation (LD).

    Attributes:
        labels: int64 ``[B, N]`` class of positives, -1 elsewhere.
        box_targets: ``[B, N, 4]`` assigned gt box (xyxy pixels; zeros on negatives).
        quality: ``[B, N]`` IoU of the (detached) decoded prediction with its gt on positives, 0 elsewhere — the
            quality focal loss target.
        pos_mask: bool ``[B, N]``.
        gt_index: int64 ``[B, N]`` index into the padded gts (-1 = background).
    """

    labels: Tensor
    box_targets: Tensor
    quality: Tensor
    pos_mask: Tensor
    gt_index: Tensor


@dataclass
class Detections:
    """Post-processed detections of one image: ``boxes [K, 4]`` xyxy pixels, ``scores [K]``, ``labels [K]``."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


class DetectionEvaluator(Evaluator):
    """COCO box AP/AR over a split (our implementation of pycocotools' ``COCOeval``, see ``kdforge.ops.coco_eval``).

    ``update`` keeps each image's detections and ground truth (on the CPU); ``compute`` gathers every process's
    images to rank 0, orders them by image id (dropping repeats a distributed sampler pads with), and scores them.

    Args:
        num_classes: categories ``0 .. num_classes - 1``.
    """

    primary: ClassVar[str] = "AP"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.records: list[ImageRecord] = []
        self._anonymous = False  # some batch came without image ids: images are numbered in arrival order
        self._device = torch.device("cpu")  # where the predictions live: the device a collective sum must use

    def reset(self) -> None:
        self.records = []
        self._anonymous = False

    def update(self, preds: list[Detections], targets: Mapping[str, Tensor]) -> None:
        """Adds a batch: one :class:`Detections` per image and the batch's padded targets."""
        boxes, labels = targets["boxes"], targets["labels"]
        ids = targets.get("image_ids")
        self._anonymous |= ids is None
        if preds:
            self._device = preds[0].boxes.device
        crowd = targets.get("iscrowd")
        areas = targets.get("areas")
        scales, sizes = targets.get("scales"), targets.get("sizes")
        for i, det in enumerate(preds):
            valid = labels[i] >= 0
            det_boxes = det.boxes.detach().cpu().double()
            if scales is not None:
                det_boxes = det_boxes / float(scales[i])
                if sizes is not None:
                    h, w = (float(v) for v in sizes[i])
                    det_boxes = torch.minimum(det_boxes.clamp(min=0), det_boxes.new_tensor([w, h, w, h]))
            gt_boxes = boxes[i][valid].detach().cpu().double()
            no_crowd = torch.zeros(gt_boxes.shape[0], dtype=torch.bool)
            gt_crowd = crowd[i][valid].detach().cpu().bool() if crowd is not None else no_crowd
            self.records.append(
                ImageRecord(
                    image_id=int(ids[i]) if ids is not None else len(self.records),
                    det_boxes=det_boxes,
                    det_scores=det.scores.detach().cpu().double(),
                    det_labels=det.labels.detach().cpu().long(),
                    gt_boxes=gt_boxes,
                    gt_labels=labels[i][valid].detach().cpu().long(),
                    gt_crowd=gt_crowd,
                    gt_areas=areas[i][valid].detach().cpu().double() if areas is not None else box_area(gt_boxes),
                )
            )

    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        """COCO metrics (``AP`` primary, fractions in [0, 1]), the same on every rank (scored on rank 0)."""
        mine = (self._anonymous, self.records)
        gathered = [mine] if reducer is None else reducer.gather(mine)
        if reducer is None:
            assert gathered is not None
            return self._score(gathered)
        # Rank 0 scores the gathered images; one sum of its values (zeros elsewhere) then gives every rank the same
        # numbers, exactly, as the training loop reads the primary metric on every rank.
        if gathered is None and self._anonymous:  # fail on this rank too rather than wait for rank 0's sum
            raise ValueError("a split scored over several processes needs targets['image_ids'] to order images")
        metrics = self._score(gathered) if gathered is not None else {}
        values = torch.tensor([metrics.get(k, 0.0) for k in METRIC_KEYS], dtype=torch.float64, device=self._device)
        values = reducer.sum(values)
        return {k: float(v) for k, v in zip(METRIC_KEYS, values.tolist(), strict=True)}

    def _score(self, gathered: list[tuple[bool, list[ImageRecord]]]) -> dict[str, float]:
        if len(gathered) > 1 and any(anonymous for anonymous, _ in gathered):
            raise ValueError("a split scored over several processes needs targets['image_ids'] to order images")
        # stable sort: repeats of an id (a distributed sampler's padding) keep rank order and the first one is kept
        records = sorted((r for _, part in gathered for r in part), key=lambda r: r.image_id)
        unique: list[ImageRecord] = []
        for r in records:
            if not unique or unique[-1].image_id != r.image_id:
                unique.append(r)
        return coco_box_metrics(unique, self.num_classes)


@TASKS.register("detection")
class DetectionTask(Task):
    """Object detection with GFL heads (Li et al., NeurIPS 2020) and ATSS assignment (Zhang et al., CVPR 2020).

    Args:
        num_classes: foreground classes.
        reg_max: edge distributions have ``reg_max + 1`` bins (GFL: 16).
        strides: stride of each output level (``GFLDetector.strides``).
        atss_topk: ATSS candidates per level (9).
        anchor_scale: ATSS anchor side in strides (ATSS/GFL: 8; 4 suits 16–48 px objects at strides 4–16).
        score_threshold: ``predict`` drops detections below it (mmdet GFL test config: 0.05).
        nms_threshold: per-class NMS IoU threshold (0.6).
        pre_nms_topk: candidates per image before NMS (mmdet ``nms_pre``: 1000).
        max_per_image: detections kept per image (100).
        loss_weights: ``{"qfl", "giou", "dfl"}`` (GFL: 1, 2, 0.25).
    """

    name: ClassVar[str] = "detection"
    summary_metrics: ClassVar[tuple[str, ...]] = ("AP", "AP50", "AP75")

    def __init__(
        self,
        num_classes: int,
        reg_max: int = 16,
        strides: tuple[int, ...] = (4, 8, 16),
        atss_topk: int = 9,
        anchor_scale: float = 4.0,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.6,
        pre_nms_topk: int = 1000,
        max_per_image: int = 100,
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        if num_classes < 1 or reg_max < 1 or atss_topk < 1 or anchor_scale <= 0:
            raise ConfigError(
                f"detection needs num_classes >= 1, reg_max >= 1, atss_topk >= 1 and anchor_scale > 0, got "
                f"{num_classes}, {reg_max}, {atss_topk}, {anchor_scale}"
            )
        if not 0.0 <= score_threshold < 1.0 or not 0.0 < nms_threshold <= 1.0:
            raise ConfigError(
                f"need 0 <= score_threshold < 1 and 0 < nms_threshold <= 1, got {score_threshold}, {nms_threshold}"
            )
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.atss_topk = atss_topk
        self.anchor_scale = anchor_scale
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.pre_nms_topk = pre_nms_topk
        self.max_per_image = max_per_image
        self.loss_weights = dict(GFL_WEIGHTS if loss_weights is None else loss_weights)

    @classmethod
    def model_names(cls) -> list[str]:
        return sorted(DETECTION_MODELS)

    def build_model(self, arch: str, **kw: Any) -> nn.Module:
        """A detector from ``DETECTION_MODELS`` (``gfl_resnet8``, ``gfl_resnet20``, ``gfl_resnet56``,
        ``gfl_resnet8x4``, ``gfl_resnet32x4``) with this task's classes and ``reg_max`` (a ``num_classes`` keyword,
        as the engine passes, is replaced by the task's)."""
        if arch not in DETECTION_MODELS:
            raise ConfigError(f"unknown detection model {arch!r}; choose from {sorted(DETECTION_MODELS)}")
        kw.pop("num_classes", None)
        return DETECTION_MODELS[arch](num_classes=self.num_classes, reg_max=self.reg_max, **kw)

    def train_outputs(self, model: nn.Module, x: Tensor) -> Outputs:
        # distillation methods read the FPN maps beside the head outputs; the loss reads only the head outputs
        return model.forward_features(x) if hasattr(model, "forward_features") else model(x)

    @staticmethod
    def head_outputs(outputs: Outputs) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(cls_scores, bbox_preds)`` per level of a model's ``forward`` or ``forward_features`` output."""
        if isinstance(outputs, DetectionFeatures):
            return tuple(outputs.cls_scores), tuple(outputs.bbox_preds)
        return tuple(outputs[0]), tuple(outputs[1])

    def image_size(self, outputs: Outputs) -> tuple[int, int]:
        """``(H, W)`` of the network input: the first level's map size times its stride (inputs are multiples of
        the largest stride, so the maps divide exactly)."""
        cls_scores, _ = self.head_outputs(outputs)
        h, w = cls_scores[0].shape[-2:]
        return h * self.strides[0], w * self.strides[0]

    def flatten(self, outputs: Outputs) -> FlatOutputs:
        """Per-level ``(cls_scores, bbox_preds)`` to :class:`FlatOutputs` with the point grid of those sizes."""
        cls_scores, bbox_preds = self.head_outputs(outputs)
        if len(cls_scores) != len(self.strides) or len(bbox_preds) != len(self.strides):
            raise ValueError(
                f"the task has {len(self.strides)} strides {self.strides} but the model gave {len(cls_scores)} "
                f"classification and {len(bbox_preds)} regression levels; build the task with the model's strides"
            )
        b = cls_scores[0].shape[0]
        cls = torch.cat([c.flatten(2).transpose(1, 2) for c in cls_scores], dim=1)
        edges = torch.cat([r.flatten(2).transpose(1, 2) for r in bbox_preds], dim=1)
        sizes = [(c.shape[-2], c.shape[-1]) for c in cls_scores]
        points, strides, counts = grid_points(sizes, self.strides, device=cls.device)
        return FlatOutputs(cls, edges.reshape(b, edges.shape[1], 4, self.reg_max + 1), points, strides, counts)

    def assign(self, outputs: Outputs | FlatOutputs, targets: Mapping[str, Tensor]) -> Assignment:
        """ATSS assignment of every point of every image; crowd gts are never assigned.

        Args:
            outputs: the model's raw outputs (or already flattened).
            targets: ``boxes [B, M, 4]``, ``labels [B, M]`` (-1 padding), optional ``iscrowd [B, M]``.
        """
        flat = outputs if isinstance(outputs, FlatOutputs) else self.flatten(outputs)
        boxes = targets["boxes"].float()
        labels = targets["labels"]
        if labels.shape[1] == 0:  # a batch without any gt row: one padding row keeps the gathers below defined
            boxes = boxes.new_zeros(boxes.shape[0], 1, 4)
            labels = labels.new_full((labels.shape[0], 1), -1)
            targets = {"boxes": boxes, "labels": labels}
        valid = labels >= 0
        if "iscrowd" in targets:
            valid = valid & ~targets["iscrowd"].bool()
        gt_index, _ = atss_assign(
            flat.points, flat.strides, flat.num_per_level, boxes, valid, self.atss_topk, self.anchor_scale
        )
        pos = gt_index >= 0
        idx = gt_index.clamp(min=0)
        box_t = torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4)) * pos[..., None]
        lab = torch.where(pos, torch.gather(labels, 1, idx), torch.full_like(idx, -1))
        with torch.no_grad():
            iou = elementwise_iou(flat.decode().detach(), box_t)
        quality = torch.where(pos, iou, torch.zeros_like(iou))
        return Assignment(labels=lab, box_targets=box_t, quality=quality, pos_mask=pos, gt_index=gt_index)

    def valuable_region(
        self, outputs: Outputs | FlatOutputs, targets: Mapping[str, Tensor], alpha: float = 0.25
    ) -> Tensor:
        """LD's valuable localisation region ``[B, N]`` (anchor IoU inside, 0 outside) with this task's ATSS settings;
        crowd and padding gts take no part. See :func:`kdforge.ops.assign.vlr_region`."""
        flat = outputs if isinstance(outputs, FlatOutputs) else self.flatten(outputs)
        valid = targets["labels"] >= 0
        if "iscrowd" in targets:
            valid = valid & ~targets["iscrowd"].bool()
        return vlr_region(
            flat.points, flat.strides, flat.num_per_level, targets["boxes"], valid, self.atss_topk, self.anchor_scale,
            alpha,
        )  # fmt: skip

    def loss(self, outputs: Outputs, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """GFL loss (QFL + GIoU + DFL, weights and normalisation of mmdet's ``GFLHead``): named weighted parts."""
        flat = self.flatten(outputs)
        a = self.assign(flat, targets)
        pos = a.pos_mask
        stride = flat.strides[None].expand_as(pos)[pos]  # [P]
        centres = flat.points[None].expand(pos.shape[0], -1, -1)[pos] / stride[:, None]
        edge_logits = flat.edge_logits[pos]  # [P, 4, R+1]
        dist = integral(edge_logits)
        pred_box = torch.cat((centres - dist[:, :2], centres + dist[:, 2:]), dim=-1)
        target_box = a.box_targets[pos] / stride[:, None]
        edge_target = torch.cat((centres - target_box[:, :2], target_box[:, 2:] - centres), dim=-1)
        edge_target = edge_target.clamp(min=0, max=self.reg_max - 0.1)  # mmdet bbox2distance(max_dis, eps=0.1)
        weight = flat.cls_logits.detach().sigmoid().amax(dim=-1)[pos]
        return gfl_loss(
            flat.cls_logits, a.labels, a.quality, pos, pred_box, target_box, edge_logits, edge_target, weight,
            self.loss_weights,
        )  # fmt: skip

    @torch.no_grad()
    def predict(self, outputs: Outputs, image_size: tuple[int, int] | None = None) -> list[Detections]:
        """Decodes boxes, drops scores below ``score_threshold``, keeps the ``pre_nms_topk`` best (point, class)
        pairs, runs per-class NMS and keeps ``max_per_image`` per image (mmdet ``GFLHead`` test pipeline, the
        top-k taken over all levels at once).

        Args:
            outputs: the model's raw outputs (``forward`` or ``forward_features``).
            image_size: ``(H, W)`` boxes are clipped to (default: the input size, :meth:`image_size`).

        Returns:
            One :class:`Detections` per image, by score descending.
        """
        flat = self.flatten(outputs)
        boxes = flat.decode()
        h, w = image_size if image_size is not None else self.image_size(outputs)
        limit = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        scores = flat.cls_logits.float().sigmoid()  # [B, N, C]
        c = scores.shape[-1]
        out = []
        for i in range(scores.shape[0]):
            s = scores[i].flatten()
            k = min(self.pre_nms_topk, s.numel())
            top_s, top_i = torch.sort(s, descending=True, stable=True)  # ties by index: deterministic
            top_s, top_i = top_s[:k], top_i[:k]
            keep = top_s > self.score_threshold
            top_s, top_i = top_s[keep], top_i[keep]
            point, cls = top_i // c, top_i % c
            b = boxes[i][point]
            kept = batched_nms(b, top_s, cls, self.nms_threshold)[: self.max_per_image]
            out.append(Detections(boxes=b[kept], scores=top_s[kept], labels=cls[kept]))
        return out

    def evaluator(self) -> DetectionEvaluator:
        return DetectionEvaluator(self.num_classes)


__all__ = ["Assignment", "DetectionEvaluator", "DetectionTask", "Detections", "FlatOutputs"]

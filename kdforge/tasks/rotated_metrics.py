"""DOTA-style mean average precision for oriented boxes (docs/tasks/oriented.md §3).

Rules of DOTA_devkit's ``dota_evaluation_task1.py`` (``voc_eval`` and ``voc_ap``, github.com/CAPTAIN-WHU/DOTA_devkit),
with the polygon IoU replaced by :func:`kdforge.ops.rotated.rbox_iou`:

* per class, detections are visited by descending score; each one looks at the ground truth of its image and class
  with the highest IoU (the first one on ties), whether or not that ground truth is already taken;
* IoU **greater than** the threshold: a *difficult* ground truth makes the detection neither TP nor FP; an untaken
  one makes it a TP and takes it; a taken one makes it an FP. Otherwise the detection is an FP;
* recall ``= TP / npos`` with ``npos`` the number of non-difficult ground truths of the class; precision
  ``= TP / max(TP + FP, eps)``;
* AP: VOC07 11-point (``max precision at recall >= t`` for ``t = 0, 0.1, …, 1.0`` — the thresholds are ``i · 0.1``
  in float64, as the devkit's ``np.arange(0., 1.1, 0.1)``, so a recall of exactly 0.3 does *not* reach
  ``t = 0.30000000000000004``), or all-point (VOC2010+: area under the monotone precision envelope).

The class's AP is averaged over the classes that have at least one non-difficult ground truth (a class without any
has no recall; mmdet's ``eval_map`` skips it the same way). mAP50:95 is the all-point mAP averaged over IoU
thresholds 0.50, 0.55, …, 0.95.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from kdforge.errors import ConfigError, DataError
from kdforge.ops.rotated import rbox_iou, rbox_overlap
from kdforge.tasks.base import Evaluator, LocalReducer, Reducer

#: IoU thresholds of mAP50:95 (index 0 is 0.5, index 5 is 0.75)
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

#: the summary metrics of :class:`OrientedEvaluator`, in a fixed order (for the cross-rank sum)
SUMMARY_KEYS: tuple[str, ...] = ("mAP50_07", "mAP50", "mAP75", "mAP50:95")

# status codes of a matched detection
TP, FP, IGNORED = 1, 0, -1


def voc_ap(recall: Tensor, precision: Tensor, use_07_metric: bool) -> Tensor:
    """Average precision from a precision/recall curve (DOTA_devkit ``voc_ap``), batched over leading dimensions.

    Args:
        recall: ``[..., D]`` cumulative recall of the detections in score order (non-decreasing).
        precision: ``[..., D]`` matching precision.
        use_07_metric: VOC07 11-point interpolation if True, else all-point (VOC2010+).

    Returns:
        ``[...]`` AP (0 where ``D == 0``).
    """
    if recall.shape[-1] == 0:
        return recall.new_zeros(recall.shape[:-1])
    if use_07_metric:
        ts = torch.tensor([i * 0.1 for i in range(11)], dtype=torch.float64, device=recall.device)
        reached = recall.unsqueeze(-2) >= ts.view(-1, 1).to(recall.dtype)  # [..., 11, D]
        best = torch.where(reached, precision.unsqueeze(-2), torch.zeros_like(precision).unsqueeze(-2))
        return best.amax(dim=-1).sum(dim=-1) / 11.0
    zero = recall.new_zeros(*recall.shape[:-1], 1)
    mrec = torch.cat([zero, recall, zero + 1], dim=-1)
    mpre = torch.cat([zero, precision, zero], dim=-1)
    envelope = torch.flip(torch.cummax(torch.flip(mpre, dims=[-1]), dim=-1).values, dims=[-1])
    # Terms where recall does not change are zero, so summing all of them equals the devkit's sum over changes.
    return ((mrec[..., 1:] - mrec[..., :-1]) * envelope[..., 1:]).sum(dim=-1)


def score_rank(scores: Tensor, real: Tensor) -> Tensor:
    """Rank ``[B, K]`` of each detection in its image: descending score, ties by position, padding last."""
    b, k = scores.shape
    keyed = torch.where(real, scores.to(torch.float64), torch.full_like(scores, -torch.inf, dtype=torch.float64))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(k, device=order.device).expand(b, k))
    return rank


def match_detections(
    det_rboxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    gt_rboxes: Tensor,
    gt_labels: Tensor,
    gt_difficult: Tensor,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> Tensor:
    """TP / FP / ignored status of every detection of a batch of images, at every IoU threshold (DOTA rules).

    Greedy matching by descending score is vectorised: a detection's best ground truth (``argmax`` IoU among those
    of its image and class) does not depend on the other detections, so at a threshold the TP of a non-difficult
    ground truth is the highest-ranked detection whose best ground truth it is with IoU above the threshold, and
    every later one is an FP — exactly what the sequential loop of ``voc_eval`` produces.

    Args:
        det_rboxes: ``[B, K, 5]`` detections (le90), padded.
        det_scores: ``[B, K]``.
        det_labels: ``[B, K]`` int64 classes, ``-1`` = padding.
        gt_rboxes: ``[B, M, 5]`` ground truths, padded.
        gt_labels: ``[B, M]`` int64, ``-1`` = padding.
        gt_difficult: ``[B, M]`` bool.
        iou_thresholds: ``T`` thresholds.

    Returns:
        ``[B, K, T]`` int8: 1 = TP, 0 = FP, -1 = ignored (matched a difficult ground truth) or padding.
        Detections keep their input positions; within an image, score ties are ranked by position.
    """
    b, k = det_labels.shape
    m = gt_labels.shape[1]
    thr = torch.tensor(list(iou_thresholds), dtype=torch.float64, device=det_rboxes.device)
    t = thr.numel()
    real = det_labels >= 0
    if k == 0:
        return torch.zeros(b, 0, t, dtype=torch.int8, device=det_rboxes.device)
    rank = score_rank(det_scores, real)
    if m == 0:
        ovmax = torch.full((b, k), -1.0, dtype=torch.float64, device=det_rboxes.device)
        jmax = torch.zeros(b, k, dtype=torch.long, device=det_rboxes.device)
        diff = torch.zeros(b, k, dtype=torch.bool, device=det_rboxes.device)
    else:
        det = det_rboxes.to(torch.float64).unsqueeze(2).expand(b, k, m, 5)
        gt = gt_rboxes.to(torch.float64).unsqueeze(1).expand(b, k, m, 5)
        same = (det_labels.unsqueeze(2) == gt_labels.unsqueeze(1)) & (gt_labels.unsqueeze(1) >= 0) & real.unsqueeze(2)
        # IoU 0 unless the pair overlaps: clip only those pairs (most pairs of a large image are far apart)
        iou = torch.where(same, torch.zeros_like(det[..., 0]), torch.full_like(det[..., 0], -1.0))
        near = same & rbox_overlap(det, gt)
        iou[near] = rbox_iou(det[near], gt[near])
        ovmax, jmax = iou.max(dim=2)  # the first maximum, as np.argmax
        diff = gt_difficult.to(torch.bool).gather(1, jmax)
    above = (ovmax.unsqueeze(-1) > thr) & real.unsqueeze(-1)  # [B, K, T]
    candidate = above & ~diff.unsqueeze(-1)
    # first (lowest-rank) candidate per (image, ground truth, threshold)
    slot = (torch.arange(b, device=jmax.device).view(b, 1) * max(m, 1) + jmax).unsqueeze(-1) * t + torch.arange(
        t, device=jmax.device
    )
    big = torch.full((b * max(m, 1) * t,), k, dtype=torch.long, device=jmax.device)
    ranks = torch.where(candidate, rank.unsqueeze(-1).expand(b, k, t), torch.full_like(slot, k))
    first = big.scatter_reduce(0, slot.flatten(), ranks.flatten(), reduce="amin").view(-1)[slot]
    is_tp = candidate & (rank.unsqueeze(-1) == first)
    status = torch.full((b, k, t), FP, dtype=torch.int8, device=det_rboxes.device)
    status[is_tp] = TP
    status[above & diff.unsqueeze(-1)] = IGNORED
    status[~real] = IGNORED
    return status


def dota_map(
    scores: Tensor,
    labels: Tensor,
    status: Tensor,
    image_keys: Tensor,
    npos: Tensor,
    use_07_metric: bool,
) -> tuple[Tensor, Tensor]:
    """Per-class AP of matched detections, at every IoU threshold.

    Args:
        scores: ``[D]`` detection scores.
        labels: ``[D]`` classes in ``[0, C)``.
        status: ``[D, T]`` from :func:`match_detections` (real detections only).
        image_keys: ``[D, 2]`` int64 (image key, rank within the image): ties in score are visited in this order,
            as a stable sort of a per-class result file written image by image.
        npos: ``[C]`` non-difficult ground truths per class.
        use_07_metric: VOC07 11-point AP if True, else all-point.

    Returns:
        ``(ap [C, T] float64, valid [C] bool)``; ``valid`` marks classes with ``npos > 0`` (others have AP 0).
    """
    c = npos.numel()
    t = status.shape[1]
    ap = torch.zeros(c, t, dtype=torch.float64, device=scores.device)
    order = torch.argsort(image_keys[:, 1], stable=True)
    order = order[torch.argsort(image_keys[order, 0], stable=True)]
    order = order[torch.sort(scores[order].to(torch.float64), descending=True, stable=True).indices]
    labels, status = labels[order], status[order]
    npos = npos.to(torch.float64)
    for cls in range(c):
        if npos[cls] <= 0:
            continue
        st = status[labels == cls].T  # [T, D_c]
        tp = torch.cumsum((st == TP).to(torch.float64), dim=-1)
        fp = torch.cumsum((st == FP).to(torch.float64), dim=-1)
        rec = tp / npos[cls]
        prec = tp / torch.clamp(tp + fp, min=torch.finfo(torch.float64).eps)
        ap[cls] = voc_ap(rec, prec, use_07_metric)
    return ap, npos > 0


def _as_padded(preds: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Predictions as padded tensors: a mapping of ``[B, K, …]`` tensors, or a list of per-image mappings."""
    if isinstance(preds, Mapping):
        return preds["rboxes"], preds["scores"], preds["labels"]
    if not isinstance(preds, Sequence) or not preds:
        raise DataError("oriented predictions must be a dict of padded tensors or a non-empty list of per-image dicts")
    k = max(int(p["labels"].shape[0]) for p in preds)
    ref = preds[0]["rboxes"]
    boxes = ref.new_zeros(len(preds), k, 5)
    scores = ref.new_zeros(len(preds), k)
    labels = torch.full((len(preds), k), -1, dtype=torch.long, device=ref.device)
    for i, p in enumerate(preds):
        n = p["labels"].shape[0]
        boxes[i, :n], scores[i, :n], labels[i, :n] = p["rboxes"], p["scores"], p["labels"]
    return boxes, scores, labels


class OrientedEvaluator(Evaluator):
    """DOTA-style mAP of oriented detections over a split, exact under data-parallel evaluation.

    ``update(preds, targets)``:

    * ``preds``: ``{"rboxes": [B, K, 5], "scores": [B, K], "labels": [B, K]}`` (label ``-1`` = padding), or a list
      of ``B`` such dicts of ``[K_i, …]`` tensors;
    * ``targets``: ``{"rboxes": [B, M, 5], "labels": [B, M]}`` (``-1`` = padding), optional ``"difficult"``
      ``[B, M]`` bool and ``"image_id"`` ``[B]`` int64.

    Matching happens in ``update`` (per image, on the batch's device); the evaluator keeps per detection its score,
    class, status at the ten IoU thresholds and image key, plus the per-class count of non-difficult ground truths.
    ``compute`` sums the counts and gathers the detections to rank 0. Ties in score between images are visited by
    image key: ``image_id`` when the targets carry it (then any split over ranks gives identical numbers), otherwise
    the order of arrival, rank by rank (identical numbers whenever scores are distinct across images).

    Metrics (fractions in ``[0, 1]``): ``mAP50_07`` (DOTA's official VOC07 11-point mAP at IoU 0.5, the primary),
    ``mAP50`` and ``mAP75`` (all-point), ``mAP50:95`` (all-point, mean over 0.50:0.05:0.95), and per class
    ``AP50_07.<name>`` and ``AP50.<name>`` for the classes with ground truth (dotted like segmentation's
    ``IoU.<name>``: ``kdforge eval`` keeps per-class entries out of its table, in ``--json`` only).
    """

    primary: ClassVar[str] = "mAP50_07"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        """Args:
        num_classes: number of classes ``C`` (labels in ``[0, C)``).
        class_names: optional names for the per-class keys (default: the class index).
        """
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"OrientedEvaluator got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = (
            [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self.reset()

    def reset(self) -> None:
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._status: list[Tensor] = []
        self._keys: list[Tensor] = []
        self._npos: Tensor | None = None
        self._images = 0
        self._with_ids: bool | None = None

    def update(self, preds: Any, targets: Mapping[str, Tensor]) -> None:
        boxes, scores, labels = _as_padded(preds)
        gt_boxes, gt_labels = targets["rboxes"], targets["labels"]
        difficult = targets.get("difficult")
        if difficult is None:
            difficult = torch.zeros_like(gt_labels, dtype=torch.bool)
        difficult = difficult.to(torch.bool)
        b = gt_labels.shape[0]
        if labels.shape[0] != b:
            raise DataError(f"oriented predictions cover {labels.shape[0]} images but the targets {b}")
        if bool((labels >= self.num_classes).any()) or bool((gt_labels >= self.num_classes).any()):
            raise DataError(f"a class label is >= num_classes={self.num_classes}; check the evaluator's num_classes")
        with_ids = "image_id" in targets
        if self._with_ids is not None and with_ids != self._with_ids:
            raise DataError("some oriented target batches carry image_id and others do not; pass it always or never")
        self._with_ids = with_ids
        image_key = (
            targets["image_id"].to(torch.long) if with_ids else torch.arange(b, device=labels.device) + self._images
        )
        self._images += b

        status = match_detections(boxes, scores, labels, gt_boxes, gt_labels, difficult)
        k = labels.shape[1]
        real = labels >= 0
        rank = score_rank(scores, real)
        keys = torch.stack([image_key.view(b, 1).expand(b, k).to(labels.device), rank], dim=-1)
        self._scores.append(scores[real].to(torch.float64))
        self._labels.append(labels[real])
        self._status.append(status[real])
        self._keys.append(keys[real])

        counted = (gt_labels >= 0) & ~difficult
        npos = torch.bincount(gt_labels[counted], minlength=self.num_classes).to(torch.float64)
        self._npos = npos if self._npos is None else self._npos + npos.to(self._npos.device)

    def _local_state(self) -> dict[str, Tensor]:
        t = len(IOU_THRESHOLDS)
        if not self._scores:
            return {
                "scores": torch.zeros(0, dtype=torch.float64),
                "labels": torch.zeros(0, dtype=torch.long),
                "status": torch.zeros(0, t, dtype=torch.int8),
                "keys": torch.zeros(0, 2, dtype=torch.long),
                "images": torch.tensor(self._images),
            }
        return {
            "scores": torch.cat(self._scores).cpu(),
            "labels": torch.cat(self._labels).cpu(),
            "status": torch.cat(self._status).cpu(),
            "keys": torch.cat(self._keys).cpu(),
            "images": torch.tensor(self._images),
        }

    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        """The metrics of the class docstring, the same on every rank: rank 0 scores the gathered detections and
        one sum of its values (zeros elsewhere, in a fixed layout) gives every rank the same numbers, exactly, as
        the training loop reads the primary metric on every rank."""
        reducer = reducer or LocalReducer()
        npos = self._npos if self._npos is not None else torch.zeros(self.num_classes, dtype=torch.float64)
        device = npos.device  # the device a collective must use (the predictions' device)
        npos = reducer.sum(npos).cpu()
        gathered = reducer.gather(self._local_state())
        local = self._score(list(gathered), npos) if gathered is not None else None
        # layout: the summary metrics, then per class (has ground truth, AP50_07, AP50)
        values = torch.zeros(len(SUMMARY_KEYS) + 3 * self.num_classes, dtype=torch.float64)
        if local is not None:
            values[: len(SUMMARY_KEYS)] = torch.tensor([local[k] for k in SUMMARY_KEYS], dtype=torch.float64)
            for cls, name in enumerate(self.class_names):
                if f"AP50.{name}" in local:
                    at = len(SUMMARY_KEYS) + 3 * cls
                    values[at : at + 3] = torch.tensor(
                        [1.0, local[f"AP50_07.{name}"], local[f"AP50.{name}"]], dtype=torch.float64
                    )
        values = reducer.sum(values.to(device)).cpu().tolist()
        out = dict(zip(SUMMARY_KEYS, values[: len(SUMMARY_KEYS)], strict=True))
        for cls, name in enumerate(self.class_names):
            has_gt, ap07, ap = values[len(SUMMARY_KEYS) + 3 * cls : len(SUMMARY_KEYS) + 3 * cls + 3]
            if has_gt > 0.5:
                out[f"AP50_07.{name}"] = ap07
                out[f"AP50.{name}"] = ap
        return out

    def _score(self, parts: list[dict[str, Tensor]], npos: Tensor) -> dict[str, float]:
        if not self._with_ids:
            # arrival order rank by rank: offset each rank's image counters past the previous ranks' images
            offset = 0
            shifted = []
            for part in parts:
                keys = part["keys"].clone()
                keys[:, 0] += offset
                offset += int(part["images"])
                shifted.append({**part, "keys": keys})
            parts = shifted
        scores = torch.cat([p["scores"] for p in parts])
        labels = torch.cat([p["labels"] for p in parts])
        status = torch.cat([p["status"] for p in parts])
        keys = torch.cat([p["keys"] for p in parts])
        ap07, valid = dota_map(scores, labels, status[:, :1], keys, npos, use_07_metric=True)
        ap, _ = dota_map(scores, labels, status, keys, npos, use_07_metric=False)
        out: dict[str, float] = {}
        if bool(valid.any()):
            out["mAP50_07"] = float(ap07[valid, 0].mean())
            per_thr = ap[valid].mean(dim=0)  # [T]
            out["mAP50"] = float(per_thr[0])
            out["mAP75"] = float(per_thr[IOU_THRESHOLDS.index(0.75)])
            out["mAP50:95"] = float(per_thr.mean())
        else:
            out.update({"mAP50_07": 0.0, "mAP50": 0.0, "mAP75": 0.0, "mAP50:95": 0.0})
        for cls in range(self.num_classes):
            if valid[cls]:
                out[f"AP50_07.{self.class_names[cls]}"] = float(ap07[cls, 0])
                out[f"AP50.{self.class_names[cls]}"] = float(ap[cls, 0])
        return out


__all__ = [
    "IOU_THRESHOLDS",
    "SUMMARY_KEYS",
    "OrientedEvaluator",
    "dota_map",
    "match_detections",
    "score_rank",
    "voc_ap",
]

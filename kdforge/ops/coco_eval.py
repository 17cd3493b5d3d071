"""COCO box AP/AR: our own PyTorch implementation of pycocotools' ``COCOeval`` (``iouType='bbox'``).

Follows ``cocoapi/PythonAPI/pycocotools/cocoeval.py`` (Lin et al., ECCV 2014) step by step, checked against it in
``tests/test_detection_metric.py`` to 1e-6:

- per image and category, detections sorted by score (stable: ties keep their input order) and cut to
  ``max(max_dets)``; ground truths sorted with ignored ones last;
- crowd ground truths (``iscrowd``) are ignored and may absorb any number of detections; their "IoU" is
  intersection over the *detection's* area;
- ground truths outside an area range are ignored for that range; unmatched detections outside it too;
- greedy matching per IoU threshold (``.50:.05:.95``): a detection takes the best still-free ground truth with
  ``IoU >= t`` (equal IoU: the later one in sorted order), preferring non-ignored ones;
- per category, detections of all images (in image order) are ranked by score, precision is made monotone and read
  at 101 recall points (``searchsorted``, 0 beyond the last recall reached);
- a category without non-ignored ground truth gets -1 and is left out of the means.
Everything is float64, as numpy computes it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: COCO area ranges (``all, small, medium, large``) in squared pixels, bounds inclusive as in COCOeval
AREA_RANGES: tuple[tuple[float, float], ...] = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
MAX_DETS: tuple[int, ...] = (1, 10, 100)


def _np_linspace(start: float, stop: float, num: int) -> Tensor:
    """``np.linspace(start, stop, num)`` bit for bit (``arange * step + start``, exact endpoint)."""
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


IOU_THRESHOLDS = _np_linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = _np_linspace(0.0, 1.0, 101)
_SPACING = 2.220446049250313e-16  # np.spacing(1): keeps tp / (tp + fp) finite


@dataclass
class ImageRecord:
    """One image's detections and ground truth, on the CPU (what an evaluator gathers).

    Attributes:
        image_id: dataset index used to order images.
        det_boxes: ``[D, 4]`` xyxy. det_scores: ``[D]``. det_labels: int64 ``[D]``.
        gt_boxes: ``[G, 4]`` xyxy. gt_labels: int64 ``[G]``. gt_crowd: bool ``[G]``.
        gt_areas: ``[G]`` area used for the area ranges (COCO's ``area`` field; box area by default).
    """

    image_id: int
    det_boxes: Tensor
    det_scores: Tensor
    det_labels: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_crowd: Tensor
    gt_areas: Tensor


def _coco_iou(dets: Tensor, gts: Tensor, crowd: Tensor) -> Tensor:
    """``[D, G]`` IoU as ``maskApi.c bbIou``: crowd columns divide by the detection's area only."""
    lt = torch.maximum(dets[:, None, :2], gts[None, :, :2])
    rb = torch.minimum(dets[:, None, 2:], gts[None, :, 2:])
    wh = rb - lt
    inter = torch.where((wh > 0).all(-1), wh[..., 0] * wh[..., 1], torch.zeros((), dtype=dets.dtype))
    area_d = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    area_g = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    union = torch.where(crowd[None, :], area_d[:, None], area_d[:, None] + area_g[None, :] - inter)
    return torch.where(inter > 0, inter / union, torch.zeros((), dtype=dets.dtype))


def _match(
    ious: Tensor, gt_ignore: Tensor, crowd: Tensor, thresholds: Tensor, det_outside: Tensor
) -> tuple[Tensor, Tensor]:
    """Greedy COCO matching of one image and category for all area ranges and IoU thresholds at once.

    Args:
        ious: ``[D, G]``, detections sorted by score.
        gt_ignore: bool ``[A, G]`` per area range.
        crowd: bool ``[G]``.
        thresholds: ``[T]``.
        det_outside: bool ``[A, D]``, detection area outside the range.

    Returns:
        ``(matched, ignored)``, bool ``[A, T, D]``.
    """
    n_area, n_gt = gt_ignore.shape
    n_det = ious.shape[0]
    n_thr = thresholds.shape[0]
    # rank of each gt in COCOeval's stable sort "non-ignored first"; among equal IoUs the later rank wins
    rank = torch.argsort(torch.argsort(gt_ignore.to(torch.int8), dim=-1, stable=True), dim=-1)
    gt_taken = torch.zeros(n_area, n_thr, n_gt, dtype=torch.bool)
    matched = torch.zeros(n_area, n_thr, n_det, dtype=torch.bool)
    ignored = torch.zeros(n_area, n_thr, n_det, dtype=torch.bool)
    thr = torch.clamp(thresholds, max=1 - 1e-10)[None, :, None]
    ign = gt_ignore[:, None, :]
    for d in range(n_det if n_gt else 0):
        row = ious[d][None, None, :]
        ok = (~gt_taken | crowd) & (row >= thr)
        real = ok & ~ign
        cand = torch.where(real.any(-1, keepdim=True), real, ok & ign)
        best = torch.where(cand, row, torch.full((), -1.0, dtype=row.dtype)).amax(-1, keepdim=True)
        tie = cand & (row == best)
        m = torch.where(tie, rank[:, None, :], torch.full((), -1, dtype=rank.dtype)).argmax(-1)  # [A, T]
        hit = cand.any(-1)
        matched[:, :, d] = hit
        ignored[:, :, d] = hit & torch.gather(gt_ignore, 1, m)
        gt_taken |= torch.nn.functional.one_hot(m, n_gt).bool() & hit[..., None]
    ignored |= ~matched & det_outside[:, None, :]
    return matched, ignored


def coco_box_metrics(
    records: list[ImageRecord],
    num_classes: int,
    iou_thresholds: Tensor = IOU_THRESHOLDS,
    area_ranges: tuple[tuple[float, float], ...] = AREA_RANGES,
    max_dets: tuple[int, ...] = MAX_DETS,
) -> dict[str, float]:
    """COCO box metrics over a list of images (scored in list order, which should be image-id order).

    Args:
        records: one :class:`ImageRecord` per image.
        num_classes: categories ``0 .. num_classes - 1``.
        iou_thresholds: ``[T]`` float64.
        area_ranges: ``(all, small, medium, large)`` ranges; the first is used for AP/AR.
        max_dets: detections per image and category for AR (the last is used for AP).

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` as fractions (``COCOeval.stats``);
        -1 where no category has a ground truth in that range.
    """
    thr = iou_thresholds.to(torch.float64)
    n_t, n_r, n_a, n_m = thr.shape[0], RECALL_THRESHOLDS.shape[0], len(area_ranges), len(max_dets)
    max_det = max_dets[-1]
    lo = torch.tensor([a[0] for a in area_ranges], dtype=torch.float64)[:, None]
    hi = torch.tensor([a[1] for a in area_ranges], dtype=torch.float64)[:, None]
    # per category: lists over images of (scores [D], matched [A, T, D], ignored [A, T, D], gt_ignore [A, G])
    per_cat: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]] = [[] for _ in range(num_classes)]
    for rec in records:
        order = torch.sort(rec.det_scores.to(torch.float64), descending=True, stable=True).indices
        d_boxes = rec.det_boxes.to(torch.float64)[order]
        d_scores = rec.det_scores.to(torch.float64)[order]
        d_labels = rec.det_labels[order]
        g_boxes = rec.gt_boxes.to(torch.float64)
        for k in torch.unique(torch.cat([d_labels, rec.gt_labels])).tolist():
            dsel = d_labels == k
            gsel = rec.gt_labels == k
            db, ds = d_boxes[dsel][:max_det], d_scores[dsel][:max_det]
            gb, crowd, garea = g_boxes[gsel], rec.gt_crowd[gsel], rec.gt_areas.to(torch.float64)[gsel]
            g_ignore = crowd[None, :] | (garea[None, :] < lo) | (garea[None, :] > hi)
            darea = (db[:, 2] - db[:, 0]) * (db[:, 3] - db[:, 1])
            d_outside = (darea[None, :] < lo) | (darea[None, :] > hi)
            ious = _coco_iou(db, gb, crowd)
            matched, ignored = _match(ious, g_ignore, crowd, thr, d_outside)
            per_cat[k].append((ds, matched, ignored, g_ignore))

    precision = -torch.ones(n_t, n_r, num_classes, n_a, n_m, dtype=torch.float64)
    recall = -torch.ones(n_t, num_classes, n_a, n_m, dtype=torch.float64)
    for k, items in enumerate(per_cat):
        if not items:
            continue
        for a in range(n_a):
            n_pos = sum(int((~g[a]).sum()) for _, _, _, g in items)
            if n_pos == 0:
                continue
            for mi, m in enumerate(max_dets):
                scores = torch.cat([s[:m] for s, _, _, _ in items])
                order = torch.sort(scores, descending=True, stable=True).indices
                dtm = torch.cat([mt[a, :, :m] for _, mt, _, _ in items], dim=1)[:, order]
                dti = torch.cat([ig[a, :, :m] for _, _, ig, _ in items], dim=1)[:, order]
                tp = torch.cumsum((dtm & ~dti).to(torch.float64), dim=1)
                fp = torch.cumsum((~dtm & ~dti).to(torch.float64), dim=1)
                nd = tp.shape[1]
                rc = tp / n_pos
                pr = tp / (fp + tp + _SPACING)
                recall[:, k, a, mi] = rc[:, -1] if nd else 0.0
                if nd == 0:
                    precision[:, :, k, a, mi] = 0.0
                    continue
                # monotone envelope: precision at recall r is the best precision at any recall >= r
                pr = torch.flip(torch.cummax(torch.flip(pr, [1]), dim=1).values, [1])
                idx = torch.searchsorted(rc.contiguous(), RECALL_THRESHOLDS.expand(n_t, -1).contiguous(), side="left")
                q = torch.gather(pr, 1, idx.clamp(max=nd - 1))
                precision[:, :, k, a, mi] = torch.where(idx < nd, q, torch.zeros((), dtype=torch.float64))

    def mean_valid(s: Tensor) -> float:
        valid = s[s > -1]
        return float(valid.mean()) if valid.numel() else -1.0

    def ap(t: int | None, a: int, mi: int) -> float:
        s = precision[:, :, :, a, mi] if t is None else precision[t, :, :, a, mi]
        return mean_valid(s)

    def ar(a: int, mi: int) -> float:
        return mean_valid(recall[:, :, a, mi])

    last = n_m - 1
    t50 = int(torch.nonzero(torch.isclose(thr, torch.tensor(0.5, dtype=torch.float64)))[0]) if n_t == 10 else None
    t75 = int(torch.nonzero(torch.isclose(thr, torch.tensor(0.75, dtype=torch.float64)))[0]) if n_t == 10 else None
    out = {
        "AP": ap(None, 0, last),
        "AP50": ap(t50, 0, last) if t50 is not None else -1.0,
        "AP75": ap(t75, 0, last) if t75 is not None else -1.0,
        "APs": ap(None, 1, last),
        "APm": ap(None, 2, last),
        "APl": ap(None, 3, last),
    }
    for mi, m in enumerate(max_dets):
        out[f"AR{m}"] = ar(0, mi)
    out.update({"ARs": ar(1, last), "ARm": ar(2, last), "ARl": ar(3, last)})
    return out


__all__ = ["AREA_RANGES", "IOU_THRESHOLDS", "MAX_DETS", "RECALL_THRESHOLDS", "ImageRecord", "coco_box_metrics"]

"""Prior points of a multi-level dense head and ATSS label assignment, batched over images with padded targets.

ATSS: Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive Training Sample
Selection", CVPR 2020; checked against mmdetection ``mmdet/models/task_modules/assigners/atss_assigner.py``:
per level the ``topk`` priors whose centres are closest to the gt centre are candidates; a candidate is positive
when its anchor-box IoU with the gt is ``>= mean + std`` of the candidates' IoUs (``torch.std``: unbiased) and its
centre lies inside the gt (every side distance ``> 0.01``); a prior positive for several gts goes to the one with the
highest IoU (ties: the first gt). The anchor box of a prior is the square of side ``anchor_scale × stride``
centred on it (mmdet's ATSS/GFL: ``octave_base_scale = 8``). Equidistant candidates are taken in point order (a
stable sort), where mmdet's ``topk`` leaves the choice to the kernel.

Difference from mmdet: prior centres are at ``(i + 0.5) × stride`` (cell centres, mmdet's ``MlvlPointGenerator``
offset 0.5) rather than the anchor generator's ``i × stride``, so a level's points are symmetric on the image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdforge.ops.boxes import box_iou


def grid_points(
    sizes: list[tuple[int, int]], strides: tuple[int, ...] | list[int], device: torch.device | None = None
) -> tuple[Tensor, Tensor, list[int]]:
    """Centres of every cell of every level, level by level, row-major (``y`` then ``x``) as ``flatten(2)`` orders.

    Args:
        sizes: ``(H_l, W_l)`` per level.
        strides: stride per level.
        device: where to build the tensors.

    Returns:
        ``(points, point_strides, num_per_level)``: ``[N, 2]`` float ``(x, y)`` pixels, ``[N]`` float strides and the
        number of points of each level.
    """
    pts, strs, counts = [], [], []
    for (h, w), s in zip(sizes, strides, strict=False):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1))
        strs.append(torch.full((h * w,), float(s), device=device))
        counts.append(h * w)
    return torch.cat(pts), torch.cat(strs), counts


def atss_assign(
    points: Tensor,
    point_strides: Tensor,
    num_per_level: list[int],
    gt_boxes: Tensor,
    gt_valid: Tensor,
    topk: int = 9,
    anchor_scale: float = 8.0,
) -> tuple[Tensor, Tensor]:
    """ATSS assignment of the priors of every image to its (padded) ground truths.

    Args:
        points: ``[N, 2]`` prior centres ``(x, y)``.
        point_strides: ``[N]`` stride of each prior.
        num_per_level: priors per level (in ``points`` order), summing to ``N``.
        gt_boxes: ``[B, M, 4]`` xyxy pixels (padding rows arbitrary).
        gt_valid: bool ``[B, M]``, False on padding.
        topk: candidates per level and gt (ATSS: 9).
        anchor_scale: anchor side in strides (ATSS/GFL: 8).

    Returns:
        ``(gt_index, anchor_iou)``: int64 ``[B, N]`` index of the assigned gt (-1 = background) and float ``[B, N]``
        the anchor-box IoU with it (0 on background).
    """
    b, m = gt_valid.shape
    n = points.shape[0]
    device = points.device
    if m == 0:
        return torch.full((b, n), -1, dtype=torch.long, device=device), torch.zeros(b, n, device=device)
    half = point_strides[:, None] * (anchor_scale / 2)
    anchors = torch.cat((points - half, points + half), dim=-1)  # [N, 4]
    gt = gt_boxes.float()
    ious = box_iou(anchors.expand(b, n, 4), gt)  # [B, N, M]
    gt_centre = (gt[..., :2] + gt[..., 2:]) / 2
    dist = torch.cdist(points.expand(b, n, 2), gt_centre)  # [B, N, M]

    cand_list = []
    start = 0
    for count in num_per_level:
        k = min(topk, count)
        # a stable sort instead of topk: equidistant points (a gt centred between grid points) are taken by index
        # on every device, so the assignment does not depend on the topk kernel
        idx = torch.sort(dist[:, start : start + count], dim=1, stable=True).indices[:, :k]
        cand_list.append(idx + start)
        start += count
    cand = torch.cat(cand_list, dim=1)  # [B, K, M]
    cand_iou = torch.gather(ious, 1, cand)
    # one candidate (a single-point model) has no spread: std 0 instead of NaN
    thr = cand_iou.mean(dim=1, keepdim=True) + torch.nan_to_num(cand_iou.std(dim=1, keepdim=True), nan=0.0)
    cand_pts = points[cand]  # [B, K, M, 2]
    lt = cand_pts - gt[:, None, :, :2]
    rb = gt[:, None, :, 2:] - cand_pts
    inside = torch.cat((lt, rb), dim=-1).amin(dim=-1) > 0.01
    is_pos = (cand_iou >= thr) & inside & gt_valid[:, None, :]

    neg_inf = torch.full((), -float("inf"), device=device)
    score = torch.full_like(ious, -float("inf"))
    # a gt's candidates are distinct points (top-k within a level, levels disjoint): one scatter writes them all
    score.scatter_(1, cand, torch.where(is_pos, cand_iou, neg_inf))
    best, gt_index = score.max(dim=2)
    assigned = best > -float("inf")
    gt_index = torch.where(assigned, gt_index, torch.full_like(gt_index, -1))
    return gt_index, torch.where(assigned, best, torch.zeros_like(best))


def _diou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise distance-IoU (Zheng et al., AAAI 2020): ``IoU - |c_a - c_b|^2 / diag^2`` of the enclosing box.

    Args: ``a`` ``[B, N, 4]``, ``b`` ``[B, M, 4]`` xyxy. Returns ``[B, N, M]``.
    """
    iou = box_iou(a, b)
    ca = (a[..., :2] + a[..., 2:]) / 2
    cb = (b[..., :2] + b[..., 2:]) / 2
    rho2 = ((ca[:, :, None] - cb[:, None]) ** 2).sum(-1)
    lt = torch.minimum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.maximum(a[:, :, None, 2:], b[:, None, :, 2:])
    diag2 = ((rb - lt) ** 2).sum(-1).clamp(min=1e-9)
    return iou - rho2 / diag2


def vlr_region(
    points: Tensor,
    point_strides: Tensor,
    num_per_level: list[int],
    gt_boxes: Tensor,
    gt_valid: Tensor,
    topk: int = 9,
    anchor_scale: float = 8.0,
    alpha: float = 0.25,
) -> Tensor:
    """LD's valuable localisation region (Zheng et al., "Localization Distillation for Dense Object Detection",
    CVPR 2022), following ``get_vlr_region`` of HikariTJU/LD's ATSS assigner.

    With the ATSS threshold ``t_g = mean + std`` of the gt's top-k candidates' anchor IoUs, a point belongs to the
    region of gt ``g`` when its anchor's DIoU with ``g`` lies in ``[alpha * t_g, t_g)`` (any point of the image, no
    centre-inside condition). Its value is the highest anchor IoU among the gts whose region holds it.

    Args:
        points, point_strides, num_per_level, gt_boxes, gt_valid, topk, anchor_scale: as :func:`atss_assign`.
        alpha: lower bound of the region relative to the threshold (LD: 0.25).

    Returns:
        ``[B, N]``: the anchor IoU inside the region, 0 outside.
    """
    b, m = gt_valid.shape
    n = points.shape[0]
    if m == 0:
        return torch.zeros(b, n, device=points.device)
    half = point_strides[:, None] * (anchor_scale / 2)
    anchors = torch.cat((points - half, points + half), dim=-1).expand(b, n, 4)
    gt = gt_boxes.float()
    ious = box_iou(anchors, gt)
    dist = torch.cdist(points.expand(b, n, 2), (gt[..., :2] + gt[..., 2:]) / 2)
    cand, start = [], 0
    for count in num_per_level:
        near = torch.sort(dist[:, start : start + count], dim=1, stable=True).indices[:, : min(topk, count)]
        cand.append(near + start)
        start += count
    cand_iou = torch.gather(ious, 1, torch.cat(cand, dim=1))
    thr = cand_iou.mean(dim=1, keepdim=True) + torch.nan_to_num(cand_iou.std(dim=1, keepdim=True), nan=0.0)
    diou = _diou(anchors, gt)
    inside = (diou < thr) & (diou >= alpha * thr) & gt_valid[:, None, :]
    best = torch.where(inside, ious, torch.full_like(ious, -1.0)).amax(dim=2)
    return best.clamp(min=0.0)


__all__ = ["atss_assign", "grid_points", "vlr_region"]

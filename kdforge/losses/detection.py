"""Task losses of the GFL detector: quality focal loss, distribution focal loss and GIoU loss.

Li et al., "Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for Dense Object Detection",
NeurIPS 2020. Formulas checked against mmdetection ``mmdet/models/losses/gfocal_loss.py`` (``quality_focal_loss``,
``distribution_focal_loss``) and ``mmdet/models/losses/iou_loss.py`` (``giou_loss``); weights and normalisation
against ``mmdet/models/dense_heads/gfl_head.py`` (see :func:`gfl_loss`). All losses compute in float32.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.ops.boxes import elementwise_giou

#: GFL's default loss weights (mmdet ``configs/gfl/gfl_r50_fpn_1x_coco.py``): QFL 1.0, GIoU 2.0, DFL 0.25
GFL_WEIGHTS: dict[str, float] = {"qfl": 1.0, "giou": 2.0, "dfl": 0.25}


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality focal loss per sample, summed over classes (GFL eq. 6).

    Every class is a sigmoid binary problem with soft target ``y``: ``y = quality`` (the IoU of the predicted box
    with its gt) for the labelled class of a positive, 0 otherwise; the BCE is scaled by ``|y - sigmoid(x)|^beta``.

    Args:
        logits: ``[N, C]``.
        labels: int64 ``[N]``, the positive's class or -1 for background.
        quality: ``[N]`` soft targets in ``[0, 1]`` (read only where ``labels >= 0``).
        beta: focusing exponent (GFL: 2).

    Returns:
        ``[N]`` unreduced loss.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    pos = labels >= 0
    target = F.one_hot(labels.clamp(min=0), num_classes).float() * (quality.float() * pos)[:, None]
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * (target - prob).abs().pow(beta)).sum(dim=1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss (GFL eq. 7) of one edge distribution per row.

    Cross-entropy against the two bins around the continuous target ``y`` (``y_l = floor(y)``, ``y_r = y_l + 1``),
    weighted ``y_r - y`` and ``y - y_l``.

    Args:
        logits: ``[n, reg_max + 1]``.
        target: ``[n]`` distances in bins, in ``[0, reg_max)``.

    Returns:
        ``[n]`` unreduced loss.
    """
    logits = logits.float()
    target = target.float()
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    return (
        F.cross_entropy(logits, left, reduction="none") * w_left
        + F.cross_entropy(logits, right, reduction="none") * w_right
    )


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - GIoU`` of matching boxes: ``[n, 4]`` xyxy each, to ``[n]`` (Rezatofighi et al., CVPR 2019)."""
    return 1.0 - elementwise_giou(pred.float(), target.float())


def gfl_loss(
    cls_logits: Tensor,
    labels: Tensor,
    quality: Tensor,
    pos_mask: Tensor,
    pos_box_pred: Tensor,
    pos_box_target: Tensor,
    pos_edge_logits: Tensor,
    pos_edge_target: Tensor,
    pos_weight: Tensor,
    weights: dict[str, float] = GFL_WEIGHTS,
) -> dict[str, Tensor]:
    """The GFL training loss with mmdet ``GFLHead.loss_by_feat``'s normalisation, summed over levels and images.

    - QFL: summed over points and classes, divided by the number of positives (at least 1);
    - GIoU: each positive weighted by ``pos_weight`` (the max predicted class score, detached), summed;
    - DFL: each of the 4 edges weighted by ``pos_weight``, summed and divided by 4;
    - GIoU and DFL are then divided by ``sum(pos_weight)`` (at least 1).
    mmdet also averages the positive count and ``sum(pos_weight)`` over GPUs (``reduce_mean``); here they are this
    process's, which equals mmdet on one GPU.

    Args:
        cls_logits: ``[B, N, C]`` classification logits of all points.
        labels: int64 ``[B, N]`` class of positives, -1 elsewhere.
        quality: ``[B, N]`` IoU targets of positives (0 elsewhere).
        pos_mask: bool ``[B, N]``.
        pos_box_pred: ``[P, 4]`` decoded boxes of the positives (any unit; GIoU is scale-free).
        pos_box_target: ``[P, 4]`` their gt boxes, same unit.
        pos_edge_logits: ``[P, 4, reg_max + 1]`` edge distributions of the positives.
        pos_edge_target: ``[P, 4]`` gt edge distances in strides, clamped to ``[0, reg_max - 0.1]``.
        pos_weight: ``[P]`` per-positive weights.
        weights: ``{"qfl", "giou", "dfl"}`` loss weights.

    Returns:
        ``{"loss_qfl", "loss_giou", "loss_dfl"}``, each already weighted.
    """
    num_pos = pos_mask.sum().float().clamp(min=1.0)
    qfl = quality_focal_loss(cls_logits.flatten(0, 1), labels.flatten(), quality.flatten()).sum() / num_pos
    w = pos_weight.float()
    avg = w.sum().clamp(min=1.0)
    giou = (giou_loss(pos_box_pred, pos_box_target) * w).sum() / avg
    reg_bins = pos_edge_logits.shape[-1]
    dfl = distribution_focal_loss(pos_edge_logits.reshape(-1, reg_bins), pos_edge_target.reshape(-1))
    dfl = (dfl.reshape(-1, 4) * w[:, None]).sum() / 4.0 / avg
    return {
        "loss_qfl": weights["qfl"] * qfl,
        "loss_giou": weights["giou"] * giou,
        "loss_dfl": weights["dfl"] * dfl,
    }


def integral(edge_logits: Tensor) -> Tensor:
    """Expected distance of each edge distribution (GFL's ``Integral``): ``[..., reg_max + 1]`` to ``[...]``."""
    bins = torch.arange(edge_logits.shape[-1], device=edge_logits.device, dtype=torch.float32)
    return (edge_logits.float().softmax(-1) * bins).sum(-1)


# ---------------------------------------------------------------- distillation


def class_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, beta: float = 2.0
) -> Tensor:
    """Classification KD of sigmoid class scores, per point: GFL's quality focal loss with the teacher's scores as
    soft targets, ``sum_c BCE(s_c / T, sigmoid(t_c / T)) * |sigmoid(t_c / T) - sigmoid(s_c / T)|^beta``.

    mmdet ``mmdet/models/losses/gfocal_loss.py`` ``quality_focal_loss_tensor_target`` (v3.2.0: BCE against a zero
    target scaled by ``sigmoid(s)^beta`` where the target is 0, BCE against the target scaled by
    ``|target - sigmoid(s)|^beta`` elsewhere — one formula, written here as one expression); the temperature (1 in
    that code) is ours, applied to both logits. ``beta = 0`` is plain sigmoid BCE-KD. The teacher is detached.

    Args:
        student_logits: ``[N, C]``.
        teacher_logits: ``[N, C]``.
        temperature: ``T``.
        beta: focusing exponent (GFL: 2).

    Returns:
        ``[N]`` unreduced loss (summed over classes).
    """
    s = student_logits.float() / temperature
    target = (teacher_logits.detach().float() / temperature).sigmoid()
    bce = F.binary_cross_entropy_with_logits(s, target, reduction="none")
    return (bce * (target - s.sigmoid()).abs().pow(beta)).sum(dim=1)


def ld_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 10.0) -> Tensor:
    """Per-distribution KD term of LD: ``T^2 * mean_bins KL(softmax(t / T) || softmax(s / T))``.

    mmdet ``knowledge_distillation_kl_div_loss`` (``kd_loss.py``): element-wise ``kl_div`` *averaged* over the
    ``reg_max + 1`` bins, times ``T^2``; the teacher is detached.

    Args:
        student_logits: ``[n, reg_max + 1]``.
        teacher_logits: ``[n, reg_max + 1]``.
        temperature: ``T`` (LD: 10).

    Returns:
        ``[n]``.
    """
    t = temperature
    target = F.softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), target, reduction="none")
    return kl.mean(dim=-1) * (t * t)


def ld_loss(
    student_edges: Tensor,
    teacher_edges: Tensor,
    pos_weight: Tensor,
    temperature: float = 10.0,
    loss_weight: float = 0.25,
) -> Tensor:
    """Localisation distillation on the positives' edge distributions (Zheng et al., CVPR 2022).

    As mmdet ``LDHead.loss_by_feat_single``: each of the 4 edges of a positive is weighted by the positive's weight
    (the student's max class score, detached, as GIoU/DFL), summed and divided by 4 (``avg_factor=4.0``); unlike GIoU
    and DFL it is *not* divided by the sum of the weights. ``loss_weight`` 0.25, ``T`` 10 (mmdet LD configs).

    Args:
        student_edges: ``[P, 4, reg_max + 1]`` student logits of the positives.
        teacher_edges: ``[P, 4, reg_max + 1]`` teacher logits at the same points.
        pos_weight: ``[P]``.
        temperature: ``T``.
        loss_weight: weight of the term.

    Returns:
        Scalar.
    """
    bins = student_edges.shape[-1]
    kl = ld_kl(student_edges.reshape(-1, bins), teacher_edges.reshape(-1, bins), temperature).reshape(-1, 4)
    return loss_weight * (kl * pos_weight.float()[:, None]).sum() / 4.0


def ld_vlr_loss(
    student_edges: Tensor,
    teacher_edges: Tensor,
    region: Tensor,
    temperature: float = 10.0,
    loss_weight: float = 0.25 * 0.25,
) -> Tensor:
    """LD on the valuable localisation region (HikariTJU/LD ``LDHead``: ``loss_ld_neg = 0.25 * loss_ld(...)``).

    Every point with ``region > 0`` (see :func:`kdforge.ops.assign.vlr_region`) contributes its 4 edges'
    :func:`ld_kl`, weighted by its region value (an anchor IoU), summed and divided by 4. The default weight is LD's
    ``0.25`` factor times the LD loss weight ``0.25``.

    Args:
        student_edges: ``[B, N, 4, reg_max + 1]``.
        teacher_edges: ``[B, N, 4, reg_max + 1]``.
        region: ``[B, N]`` region weights, 0 outside.
        temperature: ``T``.
        loss_weight: overall weight.

    Returns:
        Scalar.
    """
    keep = region > 0
    s, t, w = student_edges[keep], teacher_edges[keep], region[keep].float()
    bins = student_edges.shape[-1]
    kl = ld_kl(s.reshape(-1, bins), t.reshape(-1, bins), temperature).reshape(-1, 4)
    return loss_weight * (kl * w[:, None]).sum() / 4.0


def _channel_standardise(feat: Tensor) -> Tensor:
    """Zero mean, unit (unbiased) std per channel over batch and space, ``+1e-6`` on the std (mmrazor ``PKDLoss``)."""
    n, c, h, w = feat.shape
    flat = feat.float().transpose(0, 1).reshape(c, -1)
    flat = (flat - flat.mean(dim=-1, keepdim=True)) / (flat.std(dim=-1, keepdim=True) + 1e-6)
    return flat.reshape(c, n, h, w).transpose(0, 1)


def pkd_loss(
    student_feats: list[Tensor], teacher_feats: list[Tensor], loss_weight: float = 1.0, resize_student: bool = True
) -> Tensor:
    """PKD: Pearson-correlation feature imitation (Cao et al., NeurIPS 2022), as mmrazor ``losses/pkd_loss.py``.

    Per level both maps are standardised per channel (over batch and positions), and the loss is
    ``MSE(norm(s), norm(t)) / 2`` — equal to ``(n - 1) / n * mean_c (1 - r_c)``, with ``r_c`` the Pearson correlation
    of channel ``c``. Levels are summed. A level of another spatial size is resized bilinearly (the student to the
    teacher's size by default). Channel counts must match (PKD's detectors share a 256-wide FPN; with narrower
    students a method adds a 1×1 adapter first).

    Args:
        student_feats: per level ``[B, C, H, W]``.
        teacher_feats: per level ``[B, C, H', W']`` (detached here).
        loss_weight: overall weight (mmrazor default 1; its PKD detection configs use 6).
        resize_student: resize the student map (else the teacher's) when sizes differ.

    Returns:
        Scalar.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"PKD needs as many student as teacher levels, got {len(student_feats)} and {len(teacher_feats)}"
        )
    loss = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_feats, teacher_feats, strict=True):
        t = t.detach()
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"PKD compares equal channel counts, got {s.shape[1]} and {t.shape[1]}: adapt the student")
        if s.shape[2:] != t.shape[2:]:
            if resize_student:
                s = F.interpolate(s, size=t.shape[2:], mode="bilinear")
            else:
                t = F.interpolate(t, size=s.shape[2:], mode="bilinear")
        loss = loss + F.mse_loss(_channel_standardise(s), _channel_standardise(t)) / 2
    return loss * loss_weight


def fgd_masks(
    gt_boxes: Tensor, gt_valid: Tensor, image_size: tuple[int, int], feat_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks on one feature level (mmrazor ``FGDLoss.forward``).

    A gt box scaled to the map covers rows ``floor(y1')..ceil(y2')`` and columns ``floor(x1')..ceil(x2')`` (inclusive,
    cut at the map border) with the value ``1 / (rows * columns)`` of its *uncut* extent, so small objects weigh as
    much as large ones; overlapping boxes keep the larger value. The background mask is 1 where no box is, divided
    by its sum (when positive). Boxes are assumed to lie in the image (non-negative coordinates).

    Args:
        gt_boxes: ``[B, M, 4]`` xyxy image pixels.
        gt_valid: bool ``[B, M]``.
        image_size: ``(H_img, W_img)``.
        feat_size: ``(H, W)`` of the feature map.

    Returns:
        ``(mask_fg, mask_bg)``, each ``[B, H, W]``.
    """
    h, w = feat_size
    boxes = gt_boxes.float()
    x1 = torch.floor(boxes[..., 0] / image_size[1] * w)
    x2 = torch.ceil(boxes[..., 2] / image_size[1] * w)
    y1 = torch.floor(boxes[..., 1] / image_size[0] * h)
    y2 = torch.ceil(boxes[..., 3] / image_size[0] * h)
    value = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1))  # [B, M]
    rows = torch.arange(h, device=boxes.device, dtype=torch.float32)
    cols = torch.arange(w, device=boxes.device, dtype=torch.float32)
    in_r = (rows[None, None, :] >= y1[..., None]) & (rows[None, None, :] <= y2[..., None])  # [B, M, H]
    in_c = (cols[None, None, :] >= x1[..., None]) & (cols[None, None, :] <= x2[..., None])  # [B, M, W]
    inside = in_r[..., :, None] & in_c[..., None, :] & gt_valid[..., None, None]  # [B, M, H, W]
    covered = torch.where(inside, value[..., None, None], torch.zeros((), device=boxes.device))
    # an extra all-zero "box" keeps the max defined when there are no gt rows at all
    fg = torch.cat((covered, covered.new_zeros(covered.shape[0], 1, h, w)), dim=1).amax(dim=1)
    bg = (fg <= 0).float()
    total = bg.sum(dim=(1, 2), keepdim=True)
    bg = torch.where(total > 0, bg / total.clamp(min=1.0), bg)
    return fg, bg


class FGDLoss(nn.Module):
    """Focal and global distillation (Yang et al., CVPR 2022) of one feature level, as mmrazor
    ``losses/fgd_loss.py`` (and yzd-v/FGD ``mmdet/distillation/losses/fgd.py`` for the student alignment conv).

    ``alpha * L_fg + beta * L_bg + gamma * L_mask + lambda * L_rela`` where, with the teacher's spatial attention
    ``A_s = HW softmax(mean_c|T| / temp)`` and channel attention ``A_c = C softmax(mean_hw|T| / temp)``:

    - ``L_fg`` / ``L_bg``: ``sum((S - T)^2 * A_s * A_c * mask) / B`` with the foreground / background mask of
      :func:`fgd_masks`;
    - ``L_mask``: ``sum|A_c(S) - A_c(T)| / B + sum|A_s(S) - A_s(T)| / B`` (attention of student vs teacher);
    - ``L_rela``: ``sum((S + G_s(S) - T - G_t(T))^2) / B``, ``G`` a GcBlock context (1×1 attention conv, softmax
      pooling, 1×1 → LayerNorm → ReLU → 1×1 with the last conv zero-initialised); the modules are trained with the
      student.

    Args:
        channels: teacher channels ``C``.
        student_channels: student channels; a 1×1 ``align`` conv maps them to ``C`` when they differ (yzd-v/FGD).
        temp: attention temperature (0.5).
        alpha, beta, gamma, lam: term weights (mmrazor defaults 0.001, 0.0005, 0.001, 0.000005).
    """

    def __init__(
        self,
        channels: int,
        student_channels: int | None = None,
        temp: float = 0.5,
        alpha: float = 0.001,
        beta: float = 0.0005,
        gamma: float = 0.001,
        lam: float = 0.000005,
    ) -> None:
        super().__init__()
        self.temp, self.alpha, self.beta, self.gamma, self.lam = temp, alpha, beta, gamma, lam
        sc = channels if student_channels is None else student_channels
        self.align = nn.Conv2d(sc, channels, 1) if sc != channels else None
        self.conv_mask_s = nn.Conv2d(channels, 1, 1)
        self.conv_mask_t = nn.Conv2d(channels, 1, 1)
        half = channels // 2
        self.channel_add_conv_s = nn.Sequential(
            nn.Conv2d(channels, half, 1), nn.LayerNorm([half, 1, 1]), nn.ReLU(), nn.Conv2d(half, channels, 1)
        )
        self.channel_add_conv_t = nn.Sequential(
            nn.Conv2d(channels, half, 1), nn.LayerNorm([half, 1, 1]), nn.ReLU(), nn.Conv2d(half, channels, 1)
        )
        for conv in (self.conv_mask_s, self.conv_mask_t):  # mmengine kaiming_init(mode="fan_in"), bias 0
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for seq in (self.channel_add_conv_s, self.channel_add_conv_t):
            nn.init.zeros_(seq[-1].weight)
            nn.init.zeros_(seq[-1].bias)

    def attention(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """Spatial ``[B, H, W]`` and channel ``[B, C]`` attention of a map ``[B, C, H, W]``."""
        b, c, h, w = feat.shape
        value = feat.abs()
        spatial = h * w * F.softmax((value.mean(dim=1) / self.temp).reshape(b, -1), dim=1)
        channel = c * F.softmax(value.mean(dim=(2, 3)) / self.temp, dim=1)
        return spatial.reshape(b, h, w), channel

    def _context(self, feat: Tensor, student: bool) -> Tensor:
        b, c, h, w = feat.shape
        logits = (self.conv_mask_s if student else self.conv_mask_t)(feat).reshape(b, 1, h * w)
        weights = F.softmax(logits, dim=2)  # [B, 1, HW]
        context = torch.bmm(feat.reshape(b, c, h * w), weights.transpose(1, 2))  # [B, C, 1]
        return (self.channel_add_conv_s if student else self.channel_add_conv_t)(context.reshape(b, c, 1, 1))

    def forward(
        self, student: Tensor, teacher: Tensor, gt_boxes: Tensor, gt_valid: Tensor, image_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Args: ``student`` ``[B, C_s, H, W]``, ``teacher`` ``[B, C, H, W]`` (detached here), padded gts and the
        image size. Returns the weighted terms ``{"fgd_fg", "fgd_bg", "fgd_mask", "fgd_rela"}``."""
        s = student.float() if self.align is None else self.align(student.float())
        t = teacher.detach().float()
        if s.shape != t.shape:
            raise ValueError(f"FGD compares maps of one shape, got {tuple(s.shape)} and {tuple(t.shape)}")
        b = s.shape[0]
        sp_t, ch_t = self.attention(t)
        sp_s, ch_s = self.attention(s)
        fg, bg = fgd_masks(gt_boxes, gt_valid, image_size, (s.shape[2], s.shape[3]))
        weight = sp_t[:, None] * ch_t[:, :, None, None]  # sqrt(A)^2 in the reference's product of squares
        sq = (s - t) ** 2 * weight
        loss_fg = (sq * fg[:, None]).sum() / b
        loss_bg = (sq * bg[:, None]).sum() / b
        loss_mask = (ch_s - ch_t).abs().sum() / b + (sp_s - sp_t).abs().sum() / b
        loss_rela = ((s + self._context(s, True) - t - self._context(t, False)) ** 2).sum() / b
        return {
            "fgd_fg": self.alpha * loss_fg,
            "fgd_bg": self.beta * loss_bg,
            "fgd_mask": self.gamma * loss_mask,
            "fgd_rela": self.lam * loss_rela,
        }


def hcl_loss(student: Tensor, teacher: Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """Hierarchical context loss of ReviewKD (Chen et al., CVPR 2021; dvlab-research/ReviewKD ``hcl``): the MSE of
    the full maps plus the MSE of their adaptive average pools to ``l × l`` for each ``l`` in ``levels`` smaller than
    the map's height, with weights 1, 1/2, 1/4, ..., divided by the sum of the weights used.

    Args:
        student: ``[B, C, H, W]``.
        teacher: ``[B, C, H, W]`` (detached here).
        levels: pooled sizes, largest first.

    Returns:
        Scalar float32.
    """
    s, t = student.float(), teacher.detach().float()
    if s.shape != t.shape:
        raise ValueError(f"HCL compares maps of one shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    loss = F.mse_loss(s, t)
    weight, total = 1.0, 1.0
    for size in levels:
        if size >= s.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
        total += weight
    return loss / total


def teacher_share(teacher_feats: list[Tensor]) -> list[Tensor]:
    """Shared-KD's teacher share (reconstructed, docs/methods/shared_kd.md): each FPN level averaged with the next
    lower (finer) level pooled to its size, ``T~_l = (T_l + AvgPool(T_{l-1})) / 2``, ``T~_0 = T_0``; parameter-free.

    Args:
        teacher_feats: per level ``[B, C, H_l, W_l]``, finest first.

    Returns:
        The combined maps, same shapes.
    """
    out = [teacher_feats[0]]
    for lower, feat in itertools.pairwise(teacher_feats):
        out.append((feat + F.adaptive_avg_pool2d(lower, feat.shape[-2:])) / 2)
    return out


__all__ = [
    "GFL_WEIGHTS",
    "FGDLoss",
    "class_kd_loss",
    "distribution_focal_loss",
    "fgd_masks",
    "gfl_loss",
    "giou_loss",
    "hcl_loss",
    "integral",
    "ld_kl",
    "ld_loss",
    "ld_vlr_loss",
    "pkd_loss",
    "quality_focal_loss",
    "teacher_share",
]

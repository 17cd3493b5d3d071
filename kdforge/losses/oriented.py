"""Losses of the oriented GFL detector and of its distillation methods (docs/tasks/oriented.md,
docs/methods/rotated_ld.md, docs/methods/oriented_dkd.md). All compute in float32.

- :func:`oriented_gfl_loss`: GFL's QFL + DFL with a rotated-IoU box term and a DFL on the angle distribution;
- :func:`rotated_ld_loss`, :func:`rotated_kd_loss`, :func:`imitation_loss`: Rotated-LD's three distillation terms
  with its per-level normalisation (Zzh-tju/Rotated-LD ``ld_rotate_retina_head.py``);
- :func:`decoupled_kd_rows`: DKD's target / non-target decoupling per row, for class scores and for discretized
  localisation distributions (oriented DKD, reconstructed).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from kdforge.losses.detection import distribution_focal_loss, ld_kl, quality_focal_loss
from kdforge.ops.rotated import rbox_iou

#: default weights of :func:`oriented_gfl_loss`: GFL's QFL 1, box 2 (GIoU's weight, here on the rotated IoU loss),
#: DFL 0.25 on the side distances, and 0.25 on the angle distribution (the DFL weight, an angle being a fifth side)
ORIENTED_WEIGHTS: dict[str, float] = {"qfl": 1.0, "iou": 2.0, "dfl": 0.25, "angle": 0.25}


def rotated_iou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 − IoU`` of matching rotated boxes (mmrotate ``RotatedIoULoss``, ``linear=True`` mode), ``[n, 5]`` each to
    ``[n]``; the IoU is :func:`kdforge.ops.rotated.rbox_iou` (polygon clipping, differentiable in both boxes)."""
    return 1.0 - rbox_iou(pred.float(), target.float(), eps=eps)


def oriented_gfl_loss(
    cls_logits: Tensor,
    labels: Tensor,
    quality: Tensor,
    pos_mask: Tensor,
    pos_box_pred: Tensor,
    pos_box_target: Tensor,
    pos_edge_logits: Tensor,
    pos_edge_target: Tensor,
    pos_angle_logits: Tensor,
    pos_angle_target: Tensor,
    pos_weight: Tensor,
    weights: dict[str, float] = ORIENTED_WEIGHTS,
) -> dict[str, Tensor]:
    """The oriented detector's loss, normalised as mmdet ``GFLHead.loss_by_feat`` (see
    :func:`kdforge.losses.detection.gfl_loss`):

    - QFL summed over points and classes / number of positives (at least 1);
    - rotated IoU loss ``1 − IoU`` of each positive weighted by ``pos_weight``, summed;
    - DFL of the 4 side distances weighted by ``pos_weight``, summed and divided by 4;
    - DFL of the angle distribution weighted by ``pos_weight``, summed;
    - the last three divided by ``sum(pos_weight)`` (at least 1).

    Args:
        cls_logits: ``[B, N, C]``.
        labels: int64 ``[B, N]`` (-1 off the positives).
        quality: ``[B, N]`` rotated-IoU targets of the positives.
        pos_mask: bool ``[B, N]``.
        pos_box_pred: ``[P, 5]`` decoded rotated boxes of the positives (any length unit).
        pos_box_target: ``[P, 5]`` their gt boxes, same unit.
        pos_edge_logits: ``[P, 4, reg_max + 1]``.
        pos_edge_target: ``[P, 4]`` gt side distances in bins, in ``[0, reg_max)``.
        pos_angle_logits: ``[P, angle_bins + 1]``.
        pos_angle_target: ``[P]`` gt angle in bins, in ``[0, angle_bins)``.
        pos_weight: ``[P]``.
        weights: ``{"qfl", "iou", "dfl", "angle"}``.

    Returns:
        ``{"loss_qfl", "loss_iou", "loss_dfl", "loss_angle"}``, each already weighted.
    """
    num_pos = pos_mask.sum().float().clamp(min=1.0)
    qfl = quality_focal_loss(cls_logits.flatten(0, 1), labels.flatten(), quality.flatten()).sum() / num_pos
    w = pos_weight.float()
    avg = w.sum().clamp(min=1.0)
    iou = (rotated_iou_loss(pos_box_pred, pos_box_target) * w).sum() / avg
    bins = pos_edge_logits.shape[-1]
    dfl = distribution_focal_loss(pos_edge_logits.reshape(-1, bins), pos_edge_target.reshape(-1))
    dfl = (dfl.reshape(-1, 4) * w[:, None]).sum() / 4.0 / avg
    angle = (distribution_focal_loss(pos_angle_logits, pos_angle_target) * w).sum() / avg
    return {
        "loss_qfl": weights["qfl"] * qfl,
        "loss_iou": weights["iou"] * iou,
        "loss_dfl": weights["dfl"] * dfl,
        "loss_angle": weights["angle"] * angle,
    }


# ---------------------------------------------------------------- Rotated-LD


def _per_level(values: Tensor, region: Tensor, num_per_level: list[int]) -> Tensor:
    """``Σ_levels Σ_{points of the level} values · region / max(1, #{region > 0 in the level})``, over a batch.

    Args:
        values: ``[B, N]`` per-point losses.
        region: ``[B, N]`` region weights (0 outside).
        num_per_level: points per level, summing to ``N``.
    """
    total = values.new_zeros(())
    for v, r in zip(values.split(num_per_level, dim=1), region.split(num_per_level, dim=1), strict=True):
        count = (r > 0).sum().float().clamp(min=1.0)
        total = total + (v * r).sum() / count
    return total


def rotated_ld_loss(
    student_dists: list[Tensor],
    teacher_dists: list[Tensor],
    region: Tensor,
    num_per_level: list[int],
    temperature: float = 5.0,
    loss_weight: float = 10.0,
) -> Tensor:
    """Rotated-LD's localisation distillation: KL of every box/angle distribution at temperature ``T``.

    As ``LDRotatedRetinaHead.loss_single`` (``loss_ld``, mmdet ``KnowledgeDistillationKLDivLoss``): each distribution
    of each point contributes ``T² · mean_bins KL(softmax(t/T) ‖ softmax(s/T))`` (:func:`ld_kl`), weighted by the
    point's LD-region value (its anchor IoU), summed over the level and divided by the number of region points of
    the level (``avg_factor = ld_num``); levels are summed.

    Args:
        student_dists: per distribution kind ``[B, N, K, bins]`` (the 4 sides: ``K = 4``; the angle: ``K = 1``).
        teacher_dists: the teacher's, same shapes (detached here).
        region: ``[B, N]`` LD region.
        num_per_level: points per level.
        temperature: ``T`` (Rotated-LD configs: 5).
        loss_weight: weight (Rotated-LD r18←r34 GWD config: 10; r18←r50: 30).

    Returns:
        Scalar.
    """
    per_point = region.new_zeros(region.shape, dtype=torch.float32)
    for s, t in zip(student_dists, teacher_dists, strict=True):
        b, n, k, bins = s.shape
        per_point = per_point + ld_kl(s.reshape(-1, bins), t.reshape(-1, bins), temperature).reshape(b, n, k).sum(-1)
    return loss_weight * _per_level(per_point, region.float(), num_per_level)


def rotated_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    region: Tensor,
    num_per_level: list[int],
    temperature: float = 5.0,
    loss_weight: float = 20.0,
) -> Tensor:
    """Rotated-LD's classification KD (``loss_kd``): the same KL as :func:`rotated_ld_loss` on the class logits of
    each point (a softmax over the classes of the sigmoid head's logits, as the reference), weighted by the LD region
    and normalised per level by its size.

    Args:
        student_logits: ``[B, N, C]``.
        teacher_logits: ``[B, N, C]`` (detached here).
        region: ``[B, N]``.
        num_per_level: points per level.
        temperature: ``T`` (configs: 5).
        loss_weight: weight (r18←r34 GWD config: 20; r18←r50: 30).

    Returns:
        Scalar.
    """
    b, n, c = student_logits.shape
    kl = ld_kl(student_logits.reshape(-1, c), teacher_logits.reshape(-1, c), temperature).reshape(b, n)
    return loss_weight * _per_level(kl, region.float(), num_per_level)


def imitation_loss(
    student_feats: list[Tensor], teacher_feats: list[Tensor], masks: list[Tensor], loss_weight: float = 2.0
) -> Tensor:
    """Rotated-LD's feature imitation (``loss_im``, ``IMLoss``): per FPN level, the mean squared difference of the
    student's and teacher's feature vectors at the selected positions (mean over positions and channels); 0 for a
    level without any; levels summed.

    Args:
        student_feats: per level ``[B, C, H, W]`` (already at the teacher's width).
        teacher_feats: per level ``[B, C, H, W]`` (detached here).
        masks: per level bool ``[B, H * W]`` (row-major positions).
        loss_weight: weight (``IMLoss`` default and r18←r50 config: 2; r18←r34 configs: 0).

    Returns:
        Scalar.
    """
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t, m in zip(student_feats, teacher_feats, masks, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"feature imitation compares maps of one shape, got {tuple(s.shape)} and {tuple(t.shape)}")
        c = s.shape[1]
        sv = s.float().flatten(2).transpose(1, 2).reshape(-1, c)
        tv = t.detach().float().flatten(2).transpose(1, 2).reshape(-1, c)
        keep = m.reshape(-1)
        diff = (sv - tv) ** 2 * keep[:, None]
        # mean over the kept rows (F.mse_loss of the selection), written with a mask to keep shapes static
        total = total + diff.sum() / (keep.sum() * c).clamp(min=1)
    return loss_weight * total


# ---------------------------------------------------------------- decoupled KD


def decoupled_kd_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """DKD's ``α·TCKD + β·NCKD`` (times ``τ²``) per row, unreduced (Zhao et al., CVPR 2022).

    The per-row terms of mdistiller ``distillers/DKD.py`` ``dkd_loss`` (which sums them and divides by the batch):
    ``TCKD = KL(b^T ‖ b^S)`` of the binary target / rest distributions ``b = [p_y, 1 − p_y]`` at temperature τ,
    ``NCKD = KL(p̂^T ‖ p̂^S)`` of the distributions over the non-target entries (the reference's ``−1000·onehot``
    mask). :func:`kdforge.losses.logit.dkd_loss` is the batch mean of this. Used on class logits (target = the
    class) and on a discretized localisation distribution (target = the bin of the regression target).

    Args:
        student_logits: ``[n, K]``.
        teacher_logits: ``[n, K]`` (detached here).
        target: int64 ``[n]`` in ``[0, K)``.
        alpha: TCKD weight.
        beta: NCKD weight.
        temperature: τ.

    Returns:
        ``[n]`` float32.
    """
    k = student_logits.shape[1]
    gt = F.one_hot(target, k).bool()
    zs = student_logits.float() / temperature
    zt = teacher_logits.detach().float() / temperature

    def binary_log_probs(z: Tensor) -> Tensor:
        log_p = F.log_softmax(z, dim=1)
        log_target = log_p.masked_fill(~gt, float("-inf")).logsumexp(dim=1)
        log_rest = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1)  # log(1 − p_y) without cancellation
        return torch.stack([log_target, log_rest], dim=1)

    def kl_rows(log_t: Tensor, log_s: Tensor) -> Tensor:
        p = log_t.exp()
        # 0·log 0 = 0 where the teacher's probability underflows, not NaN (as kdforge.losses.logit.kl_div)
        return torch.where(p > 0, p * (log_t - log_s), torch.zeros_like(p)).sum(dim=1)

    tckd = kl_rows(binary_log_probs(zt), binary_log_probs(zs))
    nckd = kl_rows(F.log_softmax(zt - 1000.0 * gt, dim=1), F.log_softmax(zs - 1000.0 * gt, dim=1))
    return (alpha * tckd + beta * nckd) * temperature**2


__all__ = [
    "ORIENTED_WEIGHTS",
    "decoupled_kd_rows",
    "imitation_loss",
    "oriented_gfl_loss",
    "rotated_iou_loss",
    "rotated_kd_loss",
    "rotated_ld_loss",
]

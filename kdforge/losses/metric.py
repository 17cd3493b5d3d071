"""Metric-learning distillation losses: distances between teacher and student outputs of related samples."""

from __future__ import annotations

from torch import Tensor


def triplet_margin_loss(
    anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 5.0, p: float = 2.0, eps: float = 1e-6
) -> Tensor:
    """``mean_i max(0, ‖a_i − p_i + ε‖_p − ‖a_i − n_i + ε‖_p + m)``.

    The triplet term of triplet KD (Oki, Abe, Miyao & Kurita, "Triplet Loss for Knowledge Distillation", IJCNN
    2020): the reference (i13abe/Triplet-Loss-for-Knowledge-Distillation, ``student.py``) applies
    ``nn.TripletMarginLoss(margin=5.0)`` to raw logits, whose distance is ``F.pairwise_distance``: the ``ε`` is added
    to the difference *inside* the norm, which keeps the gradient finite when two rows coincide. Written out here so
    that the loss computes in float32 under autocast; tested against ``nn.TripletMarginLoss``.

    Args:
        anchor: ``[B, D]`` (teacher logits of the sample, a constant).
        positive: ``[B, D]`` (student logits of the same sample).
        negative: ``[B, D]`` (student logits of a sample of another class).
        margin: ``m`` ≥ 0.
        p: norm degree.
        eps: added to each difference before the norm.

    Returns:
        Scalar tensor, float32 (batch mean; 0 for an empty batch is not defined, callers skip it).
    """
    a, pos, neg = anchor.float(), positive.float(), negative.float()
    d_pos = (a - pos + eps).norm(p=p, dim=1)
    d_neg = (a - neg + eps).norm(p=p, dim=1)
    return (d_pos - d_neg + margin).clamp_min(0.0).mean()


__all__ = ["triplet_margin_loss"]

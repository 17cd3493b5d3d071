"""Relational knowledge distillation."""

from __future__ import annotations

import torch
from torch import nn

from kdforge import collectives
from kdforge.data.batch import Batch
from kdforge.losses.feature import rkd_angle_loss, rkd_distance_loss
from kdforge.losses.logit import cross_entropy
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.models.features import read_features
from kdforge.registry import METHODS


@METHODS.register("rkd")
class RKD(Method):
    """``L = γ·CE(z_s, y) + w_D·L_D + w_A·L_A`` on the pooled embeddings of the batch.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019. Checked against RepDistiller
    ``distiller_zoo/RKD.py`` (``RKDLoss(w_d=25, w_a=50)`` on ``feat[-1]``, ``-b 1``) and mdistiller
    ``distillers/RKD.py`` (``DISTANCE_WEIGHT=25``, ``ANGLE_WEIGHT=50``, ``pooled_feat``, ε 1e-12, not squared).
    ``L_D`` compares pairwise distances, each normalized by its network's mean non-zero distance; ``L_A`` compares
    the cosines of the angles of every triplet; both use the Huber (smooth L1) loss. Under DDP the relations are those
    of each rank's batch, as in the reference code run per GPU; ``global_batch`` all-gathers the embeddings so they
    span the global batch (training then equals one process on the union of the batches; tested with 2 processes).
    The paper's metric-learning weights were ``λ_D = 1, λ_A = 2``.

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        ce_weight: γ.
        distance_weight: w_D.
        angle_weight: w_A.
        squared: squared instead of plain distances in ``L_D``.
        eps: clamp of the squared distance before its square root.
        global_batch: under DDP, relations over every rank's samples (one all-gather of the embeddings per step and
            one all-reduce of their gradient); without DDP it changes nothing.
    """

    family = "relation"
    paper = "Park et al., Relational Knowledge Distillation (CVPR 2019)"
    summary = "matches the batch's pairwise distances and triplet angles of pooled embeddings"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        ce_weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        squared: bool = False,
        eps: float = 1e-12,
        global_batch: bool = False,
    ) -> None:
        super().__init__(student, teacher)
        if min(ce_weight, distance_weight, angle_weight) < 0:
            raise ValueError(
                f"ce_weight, distance_weight and angle_weight must be >= 0, got {ce_weight}, {distance_weight}, "
                f"{angle_weight}"
            )
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.ce_weight, self.distance_weight, self.angle_weight = ce_weight, distance_weight, angle_weight
        self.squared, self.eps, self.global_batch = squared, eps, global_batch

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        if len(batch) < 2:
            raise ValueError("RKD needs at least 2 samples per batch: relations are pairwise")
        with torch.no_grad():
            emb_t = read_features(self.teacher, batch.input).pooled
        out_s = read_features(self.student, batch.input)
        ce = self.ce_weight * cross_entropy(out_s.logits, batch.target)
        emb_s = out_s.pooled
        if self.global_batch:
            emb_s, emb_t = collectives.all_gather_with_grad(emb_s), collectives.all_gather_cat(emb_t)
        dist = self.distance_weight * rkd_distance_loss(emb_s, emb_t, self.squared, self.eps)
        angle = self.angle_weight * rkd_angle_loss(emb_s, emb_t)
        losses = {"ce": ce, "rkd_dist": dist, "rkd_angle": angle}
        return StepOutput(loss=ce + dist + angle, losses=losses, logits=out_s.logits)

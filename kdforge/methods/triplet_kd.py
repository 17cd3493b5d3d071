"""Triplet loss for knowledge distillation: KD plus a metric term with an other-class negative."""

from __future__ import annotations

from torch import nn

from kdforge.data.batch import Batch, batch_negatives
from kdforge.losses.logit import cross_entropy, kd_loss
from kdforge.losses.metric import triplet_margin_loss
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS


@METHODS.register("triplet_kd")
class TripletKD(Method):
    """``L = KL(p(z_t(x)) ‖ p(z_s(x))) + λ·CE(z_s(x), y) + λ_tri·max(0, ‖a−p‖₂ − ‖a−n‖₂ + m)``.

    Oki, Abe, Miyao & Kurita, "Triplet Loss for Knowledge Distillation", IJCNN 2020 (arXiv 2004.08116); checked
    against the authors' code, i13abe/Triplet-Loss-for-Knowledge-Distillation (``utils/knowledgedistillationtriplet
    .py``, ``student.py``, ``utils/kldivloss.py``, ``utils/datasets.py:KDTripletDataset``). The anchor ``a = z_t(x)``
    is the frozen teacher's logits, the positive ``p = z_s(x)`` the student's logits of the same image, the negative
    ``n = z_s(x⁻)`` the student's logits of a training sample of another class, drawn uniformly among all samples of
    the other classes by the data layer (``Batch.negative``). The student sees ``x`` and ``x⁻`` in two forward
    passes, as in the reference, so each has its own BatchNorm batch statistics. Defaults are the reference's:
    KL at τ 1 with batch-mean reduction, λ 1, λ_tri 2, m 5, Euclidean distance on raw logits.

    ``temperature`` generalises the soft term to Hinton's ``τ²·KL`` at ``τ`` (identical at the default τ 1).

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        temperature: τ of the soft term.
        kd_weight: weight of the soft term (1 in the reference).
        ce_weight: λ, weight of the cross-entropy.
        triplet_weight: λ_tri, weight of the triplet term.
        margin: m.
    """

    family = "metric"
    paper = "Oki et al., Triplet Loss for Knowledge Distillation (IJCNN 2020)"
    summary = "KD + triplet margin on logits: teacher anchor, student positive, student on an other-class negative"
    needs_negatives = True
    teacher_cacheable = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        triplet_weight: float = 2.0,
        margin: float = 5.0,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if min(kd_weight, ce_weight, triplet_weight, margin) < 0:
            raise ValueError("kd_weight, ce_weight, triplet_weight and margin must be >= 0")
        self.temperature = temperature
        self.kd_weight, self.ce_weight, self.triplet_weight = kd_weight, ce_weight, triplet_weight
        self.margin = margin

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        negative = batch_negatives(batch, "triplet_kd")
        logits_t = self.teacher_outputs(batch)
        logits_s = self.student(batch.input)
        logits_n = self.student(negative)
        kd = self.kd_weight * kd_loss(logits_s, logits_t, self.temperature)
        ce = self.ce_weight * cross_entropy(logits_s, batch.target)
        tri = self.triplet_weight * triplet_margin_loss(logits_t, logits_s, logits_n, self.margin)
        return StepOutput(loss=kd + ce + tri, losses={"kd": kd, "ce": ce, "triplet": tri}, logits=logits_s)

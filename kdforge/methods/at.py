"""Attention transfer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.losses.feature import at_loss
from kdforge.losses.logit import cross_entropy
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.models.features import read_features
from kdforge.registry import METHODS


def paired_stages(feats_s: list[Tensor], feats_t: list[Tensor], stages: list[int] | None) -> list[tuple[int, int]]:
    """Index pairs ``(student, teacher)`` into ``Features.feats``.

    ``None`` pairs the stages after the stem in order, stopping at the shorter network (RepDistiller's
    ``zip(feat_s[1:-1], feat_t[1:-1])``); a list names the same indices in both networks.
    """
    if stages is None:
        return [(i, i) for i in range(1, min(len(feats_s), len(feats_t)))]
    n_s, n_t = len(feats_s), len(feats_t)
    for i in stages:
        if not (-n_s <= i < n_s and -n_t <= i < n_t):
            raise ValueError(f"AT stage {i} is out of range: the student has {n_s} feature maps, the teacher {n_t}")
    return [(i % n_s, i % n_t) for i in stages]


@METHODS.register("at")
class AT(Method):
    """``L = γ·CE(z_s, y) + β·Σ_stages mean((Q(F_s) − Q(F_t))²)``, ``Q(F) = normalize(mean_c F^p)``.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional Neural
    Networks via Attention Transfer", ICLR 2017. Checked against RepDistiller ``distiller_zoo/AT.py`` (with
    ``train_student.py --distill attention -b 1000``) and mdistiller ``distillers/AT.py`` (``AT.P=2``,
    ``FEAT_WEIGHT=1000``): every stage after the stem, the larger map of a pair adaptive-average-pooled to the
    smaller one first. The teacher runs under ``no_grad``; AT has no trainable module of its own.

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        p: power of the attention map.
        ce_weight: γ.
        at_weight: β.
        stages: indices into ``Features.feats`` used in both networks; ``None`` = all stages after the stem.
    """

    family = "feature"
    paper = "Zagoruyko & Komodakis, Paying More Attention to Attention (ICLR 2017)"
    summary = "matches L2-normalized spatial attention maps (channel mean of F^p) at every stage"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        p: float = 2.0,
        ce_weight: float = 1.0,
        at_weight: float = 1000.0,
        stages: list[int] | None = None,
    ) -> None:
        super().__init__(student, teacher)
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        if ce_weight < 0 or at_weight < 0:
            raise ValueError(f"ce_weight and at_weight must be >= 0, got {ce_weight}, {at_weight}")
        if stages is not None and not stages:
            raise ValueError("stages must name at least one feature map, or be null for all stages")
        self.p, self.ce_weight, self.at_weight = p, ce_weight, at_weight
        self.stages = stages

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        with torch.no_grad():
            feats_t = read_features(self.teacher, batch.input).feats
        out_s = read_features(self.student, batch.input)
        pairs = paired_stages(out_s.feats, feats_t, self.stages)
        if not pairs:
            raise ValueError("AT found no stage pair: both networks need a feature map after the stem")
        transfer = sum(at_loss(out_s.feats[i], feats_t[j], self.p) for i, j in pairs)
        ce = self.ce_weight * cross_entropy(out_s.logits, batch.target)
        loss_at = self.at_weight * transfer
        return StepOutput(loss=ce + loss_at, losses={"ce": ce, "at": loss_at}, logits=out_s.logits)

"""Attention transfer on the encoder/decoder stages of an image-to-image network."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.image import attention_distill_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.models.dense.enhancer import select_stages
from kdforge.registry import METHODS


@METHODS.register("at_enh")
class ATEnh(Method):
    """``L = L_task(Î_s, I_gt) + β·Σ_l mean_{b,pos} (Q(F_s^l) − Q(F_t^l))²``, ``Q(F) = normalize(mean_c F^p)``.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017 (RepDistiller's ``AT``, the same map and
    normalization as the classification method ``at``), on the enhancer's stages instead of a classifier's and with
    the enhancement task loss instead of cross-entropy (the classification ``at`` reads logits and labels, so it is
    a separate method rather than a task switch inside it). :func:`kdforge.losses.image.attention_distill_loss`;
    no trainable module of its own.

    Args:
        student: the enhancement student (``forward_features``).
        teacher: the frozen enhancement teacher.
        p: the attention power.
        at_weight: β (1000, AT's weight for this normalization and stage sum).
        stages: indices into ``EnhancerFeatures.feats``; ``None`` = all seven.
    """

    family = "dense"
    paper = "Zagoruyko & Komodakis, Paying More Attention to Attention (ICLR 2017), on every enhancer stage"
    summary = "matches L2-normalized spatial attention maps of every encoder/decoder stage"
    tasks = ("enhancement",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        p: float = 2.0,
        at_weight: float = 1000.0,
        stages: list[int] | None = None,
    ) -> None:
        super().__init__(student, teacher)
        if not p > 0 or not at_weight >= 0:
            raise ValueError(f"need p > 0 and at_weight >= 0, got {p}, {at_weight}")
        self.stages = select_stages(len(student.stage_channels), stages)
        self.p, self.at_weight = p, at_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t = self.teacher.forward_features(batch.input)
        parts = self.task.loss(out, batch.task_targets)
        fs = [out.feats[i] for i in self.stages]
        ft = [t.feats[i] for i in self.stages]
        parts["kd_attention"] = self.at_weight * attention_distill_loss(fs, ft, self.p)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)


__all__ = ["ATEnh"]

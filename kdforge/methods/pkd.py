"""PKD: Pearson-correlation feature distillation on the FPN levels of a detector."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.detection import pkd_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


def _widths(model: nn.Module) -> list[int]:
    return [info.channels for info in model.feature_info]


@METHODS.register("pkd")
class PKD(Method):
    """``L = L_GFL(s) + w · Σ_levels MSE(norm(A_l(S_l)), norm(T_l)) / 2`` on the FPN maps.

    Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient",
    NeurIPS 2022, loss exact against mmrazor ``losses/pkd_loss.py`` (:func:`kdforge.losses.detection.pkd_loss`,
    docs/methods/pkd.md). PKD's detectors share a 256-wide FPN; when the student's FPN is narrower than the
    teacher's, a 1×1 conv ``A_l`` per level (trained with the student, in its optimizer group, not exported) maps it
    to the teacher's width — otherwise ``A_l`` is the identity. Per-channel standardisation makes the loss blind to
    a per-channel affine map, so the adapter only has to find the channel mixing.

    Args:
        student: the GFL student.
        teacher: the frozen GFL teacher (same strides).
        loss_weight: w (mmrazor's PKD detection configs: 6; its loss default: 1).
    """

    family = "dense"
    paper = "Cao et al., PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient"
    summary = "Pearson correlation of standardised FPN maps, teacher to student"
    tasks = ("detection",)
    standard_pairs = False

    def __init__(self, student: nn.Module, teacher: nn.Module, loss_weight: float = 6.0) -> None:
        super().__init__(student, teacher)
        if loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {loss_weight}")
        self.loss_weight = loss_weight
        s_w, t_w = _widths(student), _widths(teacher)
        if len(s_w) != len(t_w):
            raise ValueError(f"PKD pairs FPN levels: the student has {len(s_w)}, the teacher {len(t_w)}")
        self.adapters = nn.ModuleList(
            nn.Conv2d(s, t, 1) if s != t else nn.Identity() for s, t in zip(s_w, t_w, strict=True)
        )

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_feats = self.teacher.forward_features(batch.input).feats
        parts = self.task.loss(out, batch.task_targets)
        s_feats = [adapt(f) for adapt, f in zip(self.adapters, out.feats, strict=True)]
        parts["pkd"] = pkd_loss(s_feats, t_feats, self.loss_weight)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

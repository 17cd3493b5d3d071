"""FGD: focal and global feature distillation on the FPN levels of a detector."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.detection import FGDLoss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("fgd")
class FGD(Method):
    """``L = L_GFL(s) + Σ_levels (α L_fg + β L_bg + γ L_mask + λ L_rela)`` on the FPN maps.

    Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022; one
    :class:`kdforge.losses.detection.FGDLoss` per FPN level (exact against mmrazor ``losses/fgd_loss.py``, student
    alignment conv of yzd-v/FGD when the widths differ; docs/methods/fgd.md). The GcBlock context modules and the
    alignment convs are trained with the student (the method's parameters, in the student's optimizer group) and not
    exported. The four terms are summed over levels and reported separately.

    Args:
        student: the GFL student.
        teacher: the frozen GFL teacher (same strides).
        temp: attention temperature (0.5).
        alpha, beta, gamma, lam: term weights (mmrazor defaults 0.001, 0.0005, 0.001, 0.000005; FGD tunes them per
            detector, e.g. yzd-v/FGD's GFL configs use alpha 2e-5 and beta 1e-5 on 256-wide FPNs of COCO images).
    """

    family = "dense"
    paper = "Yang et al., Focal and Global Knowledge Distillation for Detectors (CVPR 2022)"
    summary = "attention-weighted foreground/background imitation, attention and global-relation losses on FPN maps"
    tasks = ("detection",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temp: float = 0.5,
        alpha: float = 0.001,
        beta: float = 0.0005,
        gamma: float = 0.001,
        lam: float = 0.000005,
    ) -> None:
        super().__init__(student, teacher)
        if temp <= 0 or min(alpha, beta, gamma, lam) < 0:
            raise ValueError(f"need temp > 0 and non-negative weights, got {temp}, {alpha}, {beta}, {gamma}, {lam}")
        s_w = [info.channels for info in student.feature_info]
        t_w = [info.channels for info in teacher.feature_info]
        if len(s_w) != len(t_w):
            raise ValueError(f"FGD pairs FPN levels: the student has {len(s_w)}, the teacher {len(t_w)}")
        self.losses = nn.ModuleList(FGDLoss(t, s, temp, alpha, beta, gamma, lam) for s, t in zip(s_w, t_w, strict=True))

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        task = self.task
        out = task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_feats = self.teacher.forward_features(batch.input).feats
        targets = batch.task_targets
        parts = task.loss(out, targets)
        valid = targets["labels"] >= 0
        if "iscrowd" in targets:
            valid = valid & ~targets["iscrowd"].bool()
        size = task.image_size(out)
        terms: dict[str, torch.Tensor] = {}
        for loss, s, t in zip(self.losses, out.feats, t_feats, strict=True):
            for key, value in loss(s, t, targets["boxes"], valid, size).items():
                terms[key] = terms[key] + value if key in terms else value
        parts.update(terms)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

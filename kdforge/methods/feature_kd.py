"""FitNets-style feature distillation on the encoder/decoder stages of an image-to-image network."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.image import FeatureAdapter, feature_distill_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.models.dense.enhancer import select_stages
from kdforge.registry import METHODS


@METHODS.register("feature_kd")
class FeatureKD(Method):
    """``L = L_task(Î_s, I_gt) + λ·mean_l MSE(r_l(F_s^l), F_t^l)`` over the chosen encoder/decoder stages.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, applied to every stage of the U-Net enhancer
    (teacher and student share their stage resolutions, so a 1×1 regressor :class:`FeatureAdapter` per stage maps
    the student's channels onto the teacher's; no resizing). The regressors train with the student, in its
    parameter group, and are not exported. :func:`kdforge.losses.image.feature_distill_loss`.

    Args:
        student: the enhancement student (``forward_features``, ``stage_channels``).
        teacher: the frozen enhancement teacher.
        kd_weight: λ (10: the untrained student's stage MSE to a trained teacher is ~0.035 on the synthetic CIFAR
            pairs against a task loss ~1, so 10 sets it on the scale of the ground-truth L1 term; measured
            2026-11-28 on the smoke teacher, unet_enhancer_w12 → w8).
        stages: indices into ``EnhancerFeatures.feats`` (``[enc0, enc1, enc2, bottleneck, dec2, dec1, dec0]``);
            ``None`` = all seven.
    """

    family = "dense"
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets (ICLR 2015), on every enhancer stage"
    summary = "1x1 regressors map each student stage onto the teacher's; MSE between them"
    tasks = ("enhancement",)
    standard_pairs = False

    def __init__(
        self, student: nn.Module, teacher: nn.Module, kd_weight: float = 10.0, stages: list[int] | None = None
    ) -> None:
        super().__init__(student, teacher)
        if not kd_weight >= 0:
            raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")
        cs, ct = list(student.stage_channels), list(teacher.stage_channels)
        if len(cs) != len(ct):
            raise ValueError(f"the student has {len(cs)} stage maps, the teacher {len(ct)}; they must match")
        self.stages = select_stages(len(cs), stages)
        self.adapter = FeatureAdapter([cs[i] for i in self.stages], [ct[i] for i in self.stages])
        self.kd_weight = kd_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t = self.teacher.forward_features(batch.input)
        parts = self.task.loss(out, batch.task_targets)
        fs = [out.feats[i] for i in self.stages]
        ft = [t.feats[i] for i in self.stages]
        parts["kd_feature"] = self.kd_weight * feature_distill_loss(fs, ft, self.adapter)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

    def exports(self) -> dict[str, nn.Module]:
        return {"student": self.student}  # the regressors serve training only


__all__ = ["FeatureKD"]

"""Shared-KD for detectors (reconstructed from its abstract): teacher share, multi-step transfer, mutual learning."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from kdforge.data.batch import Batch
from kdforge.losses.detection import hcl_loss, teacher_share
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


def step2_weight(fraction: float) -> float:
    """Weight of the second transfer step (raw teacher) at ``fraction`` of the run: 0 in the first third, a linear
    ramp to 1 over the second, 1 after (the multi-step schedule of docs/methods/shared_kd.md)."""
    return min(1.0, max(0.0, 3.0 * fraction - 1.0))


@METHODS.register("shared_kd")
class SharedKD(Method):
    """``L = L_GFL(s) + λ·(L_share + w₂(t)·L_raw + μ·L_mutual)`` on the FPN maps — **reconstructed**.

    Guo, Zhang, Liang, "Shared Knowledge Distillation Network for Object Detection", Electronics 13(8):1595, 2024;
    only the abstract is available, so every choice here is ours, named in docs/methods/shared_kd.md:

    - teacher share: each teacher FPN level combined with the lower (finer) one, parameter-free
      (:func:`kdforge.losses.detection.teacher_share`);
    - multi-step transfer: step 1 ``L_share = Σ_l HCL(A_l(S_l), T~_l)`` (the shared, easier target), step 2
      ``L_raw = Σ_l HCL(A_l(S_l), T_l)`` ramped in by :func:`step2_weight`; HCL is ReviewKD's simple multi-scale MSE
      (:func:`kdforge.losses.detection.hcl_loss`);
    - student mutual learning: neighbouring student levels teach each other,
      ``L_mutual = Σ_l MSE(S_l, sg(Up(S_{l+1})))`` (the most speculative part);
    - no transformation weights when the FPN widths match (the paper's 256-wide FPNs); our zoo's differ, so a 1×1
      ``A_l`` (trained with the student, not exported) maps the student width to the teacher's, else the identity.

    Args:
        student: the GFL student.
        teacher: the frozen GFL teacher (same strides).
        kd_weight: λ (1, ReviewKD's detection scale for mean-reduced MSE).
        mutual_weight: μ (0.1).
    """

    family = "dense"
    paper = "Guo, Zhang, Liang, Shared Knowledge Distillation Network for Object Detection (Electronics 2024)"
    exact = False
    summary = "shared lower-level teacher targets, multi-step HCL transfer, mutual learning of student levels"
    tasks = ("detection",)
    standard_pairs = False

    def __init__(
        self, student: nn.Module, teacher: nn.Module, kd_weight: float = 1.0, mutual_weight: float = 0.1
    ) -> None:
        super().__init__(student, teacher)
        if kd_weight < 0 or mutual_weight < 0:
            raise ValueError(f"need kd_weight >= 0 and mutual_weight >= 0, got {kd_weight}, {mutual_weight}")
        self.kd_weight, self.mutual_weight = kd_weight, mutual_weight
        s_w = [info.channels for info in student.feature_info]
        t_w = [info.channels for info in teacher.feature_info]
        if len(s_w) != len(t_w):
            raise ValueError(f"Shared-KD pairs FPN levels: the student has {len(s_w)}, the teacher {len(t_w)}")
        self.adapters = nn.ModuleList(
            nn.Conv2d(s, t, 1) if s != t else nn.Identity() for s, t in zip(s_w, t_w, strict=True)
        )

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_feats = self.teacher.forward_features(batch.input).feats
            shared = teacher_share(t_feats)
        parts = self.task.loss(out, batch.task_targets)
        s_feats = [adapt(f) for adapt, f in zip(self.adapters, out.feats, strict=True)]
        parts["share"] = self.kd_weight * sum(hcl_loss(s, t) for s, t in zip(s_feats, shared, strict=True))
        w2 = step2_weight(progress.fraction)
        parts["raw"] = self.kd_weight * w2 * sum(hcl_loss(s, t) for s, t in zip(s_feats, t_feats, strict=True))
        mutual = [
            F.mse_loss(fine.float(), F.interpolate(coarse.detach().float(), size=fine.shape[-2:], mode="bilinear"))
            for fine, coarse in itertools.pairwise(out.feats)
        ]
        parts["mutual"] = self.kd_weight * self.mutual_weight * sum(mutual)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

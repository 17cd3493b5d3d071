"""Low-light image enhancement with knowledge distillation (reconstructed)."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.image import FeatureAdapter, lowlight_kd_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("lowlight_kd")
class LowlightKD(Method):
    """``L = L_task + β·Σ_l AT_l + λ_o·|Î_s − Î_t|₁ + λ_g·L_grad(Î_s, Î_t) + λ_f·mean_l MSE(r_l(F_s^l), F_t^l)``.

    Li, Wang & Zhang, "Low-light image enhancement with knowledge distillation", Neurocomputing 2022
    (doi 10.1016/j.neucom.2022.10.083), reconstructed from its abstract: the student learns from the ground truth
    (the task loss) and from the teacher through attention maps of every encoder/decoder stage, the teacher's output
    and its edges (the reconstructed gradient guidance); FitNets regressors are off by default. Every choice is in
    docs/methods/lowlight_kd.md; the loss is :func:`kdforge.losses.image.lowlight_kd_loss`.

    Args:
        student: the enhancement student (``forward_features``, ``stage_channels``).
        teacher: the frozen enhancement teacher.
        attention_weight: β.
        output_weight: λ_o.
        gradient_weight: λ_g.
        feature_weight: λ_f (> 0 adds the :class:`FeatureAdapter` regressors, trained with the student).
        p: the attention power.
    """

    family = "dense"
    paper = "Li, Wang & Zhang, Low-light image enhancement with knowledge distillation (Neurocomputing 2022)"
    exact = False
    summary = "attention maps of every stage, the teacher's output and its edges (+ optional FitNets)"
    tasks = ("enhancement",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        attention_weight: float = 1000.0,
        output_weight: float = 1.0,
        gradient_weight: float = 1.0,
        feature_weight: float = 0.0,
        p: float = 2.0,
    ) -> None:
        super().__init__(student, teacher)
        weights = (attention_weight, output_weight, gradient_weight, feature_weight)
        if not all(w >= 0 for w in weights) or not p > 0:
            raise ValueError(f"weights must be >= 0 and p > 0, got {weights}, p={p}")
        if not any(weights):
            raise ValueError("every distillation weight is 0; use method vanilla to train without a teacher")
        self.attention_weight, self.output_weight = attention_weight, output_weight
        self.gradient_weight, self.feature_weight, self.p = gradient_weight, feature_weight, p
        self.adapter = FeatureAdapter(student.stage_channels, teacher.stage_channels) if feature_weight > 0 else None

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t = self.teacher.forward_features(batch.input)
        parts = self.task.loss(out, batch.task_targets)
        kd = lowlight_kd_loss(
            out.out, t.out, out.feats, t.feats,
            attention_weight=self.attention_weight, output_weight=self.output_weight,
            gradient_weight=self.gradient_weight, feature_weight=self.feature_weight, adapter=self.adapter, p=self.p,
        )  # fmt: skip
        parts.update(kd)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

    def exports(self) -> dict[str, nn.Module]:
        return {"student": self.student}  # the regressors serve training only


__all__ = ["LowlightKD"]

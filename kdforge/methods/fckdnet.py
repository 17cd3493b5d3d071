"""FCKDNet: feature-condensation knowledge distillation for semantic segmentation (reconstructed)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.dense import fckd_losses
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("fckdnet")
class FCKDNet(Method):
    """``L = L_task(s) + λ_sp·L_spatial + λ_ch·L_channel`` on condensed, softly enhanced segmentation logits.

    Yuan et al., "FCKDNet: A Feature Condensation Knowledge Distillation Network for Semantic Segmentation", Entropy
    25(1):125, 2023, reconstructed from its abstract (:func:`kdforge.losses.dense.fckd_losses`; every choice in
    docs/methods/fckdnet.md): the teacher's pixel entropy gives a condensation matrix that keeps confident
    ("foreground knowledge") pixels and damps uncertain ("background noise") ones; spatial and channel soft
    enhancement re-weight what remains; a spatial-condensation loss (each class's distribution over positions, CWD
    form) and a channel-condensation loss (each pixel's distribution over classes) are distilled separately.

    Args:
        student: the segmentation student.
        teacher: the frozen segmentation teacher.
        temperature: T of both KL terms.
        spatial_weight: λ_sp.
        channel_weight: λ_ch.
        mode: condensation ``soft`` (``1 − H``) or ``hard`` (keep the ``quantile`` most confident pixels).
        quantile: ρ of ``hard`` condensation.
        enhance: apply the spatial × channel soft enhancement.
        enhance_temperature: T_e of the enhancement.
    """

    family = "dense"
    paper = "Yuan et al., FCKDNet: A Feature Condensation Knowledge Distillation Network for Semantic Segmentation"
    exact = False
    summary = "entropy-condensed, softly enhanced logits; separate spatial and channel condensation losses"
    tasks = ("segmentation",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        spatial_weight: float = 3.0,
        channel_weight: float = 10.0,
        mode: Literal["soft", "hard"] = "soft",
        quantile: float = 0.5,
        enhance: bool = True,
        enhance_temperature: float = 1.0,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or enhance_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature}, {enhance_temperature}")
        if spatial_weight < 0 or channel_weight < 0 or not 0.0 < quantile <= 1.0:
            raise ValueError("spatial_weight and channel_weight must be >= 0 and quantile in (0, 1]")
        self.temperature, self.spatial_weight, self.channel_weight = temperature, spatial_weight, channel_weight
        self.mode, self.quantile, self.enhance, self.enhance_temperature = mode, quantile, enhance, enhance_temperature

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_logits = self.teacher(batch.input)
        parts = self.task.loss(out, batch.task_targets)
        kd = fckd_losses(
            out.logits, t_logits, self.temperature, self.mode, self.quantile, self.enhance, self.enhance_temperature
        )
        parts["spatial"] = self.spatial_weight * kd["spatial"]
        parts["channel"] = self.channel_weight * kd["channel"]
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

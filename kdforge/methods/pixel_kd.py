"""Pixel-wise knowledge distillation for semantic segmentation."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.dense import pixel_kd_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("pixel_kd")
class PixelKD(Method):
    """``L = L_task(s) + α·τ²·mean_i KL(p_t,i(τ) ‖ p_s,i(τ))`` over the pixels ``i`` not ignored.

    Hinton's KD at every pixel of the segmentation logits (Liu et al., "Structured Knowledge Distillation for
    Semantic Segmentation", CVPR 2019, pixel-wise term; mmrazor's ``KLDivergence`` on segmentation logits). Both
    networks' logits are compared at the input size, so any output strides work.

    Args:
        student: the segmentation student.
        teacher: the frozen segmentation teacher.
        temperature: τ.
        kd_weight: α (10, as Liu et al. weight their pixel-wise term).
    """

    family = "dense"
    paper = "Liu et al., Structured Knowledge Distillation for Semantic Segmentation (CVPR 2019), pixel-wise term"
    summary = "per-pixel KL between teacher and student class distributions at τ"
    tasks = ("segmentation",)
    standard_pairs = False

    def __init__(
        self, student: nn.Module, teacher: nn.Module, temperature: float = 1.0, kd_weight: float = 10.0
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or kd_weight < 0:
            raise ValueError(f"need temperature > 0 and kd_weight >= 0, got {temperature}, {kd_weight}")
        self.temperature, self.kd_weight = temperature, kd_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_logits = self.teacher(batch.input)
        parts = self.task.loss(out, batch.task_targets)
        valid = batch.task_targets != getattr(self.task, "ignore_index", 255)
        parts["kd"] = self.kd_weight * pixel_kd_loss(out.logits, t_logits, self.temperature, valid)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

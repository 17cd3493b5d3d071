"""Output distillation for image-to-image tasks: the teacher's enhanced image as a second target."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.image import output_distill_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("output_kd")
class OutputKD(Method):
    """``L = L_task(Î_s, I_gt) + λ·mean|Î_s − Î_t|``: L1 between the student's and the frozen teacher's outputs.

    The output (response) distillation of image restoration: the teacher's prediction is a second target of the
    same kind as the ground truth (the ``kd_output`` part of the reconstructed low-light KD of Li, Wang & Zhang,
    Neurocomputing 2022, here alone, as the baseline the feature and attention methods are compared with).
    :func:`kdforge.losses.image.output_distill_loss`.

    Args:
        student: the enhancement student.
        teacher: the frozen enhancement teacher.
        kd_weight: λ (1: the weight of the task's ground-truth L1, so neither target dominates).
    """

    family = "dense"
    paper = "output (response) distillation for image restoration: L1 to the teacher's enhanced image"
    summary = "L1 between the student's and the teacher's enhanced images"
    tasks = ("enhancement",)
    standard_pairs = False

    def __init__(self, student: nn.Module, teacher: nn.Module, kd_weight: float = 1.0) -> None:
        super().__init__(student, teacher)
        if not kd_weight >= 0:
            raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")
        self.kd_weight = kd_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_out = self.teacher(batch.input)
        parts = self.task.loss(out, batch.task_targets)
        parts["kd_output"] = self.kd_weight * output_distill_loss(out.out, t_out)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)


__all__ = ["OutputKD"]

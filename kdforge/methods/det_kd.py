"""Classification-score KD for dense detectors (the class-KD baseline of the GFL/LD literature)."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.detection import class_kd_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("det_kd")
class DetKD(Method):
    """``L = L_GFL(s) + w · Σ_points Σ_c BCE(s/T, σ(t/T)) · |σ(t/T) − σ(s/T)|^β / N_pos`` on the class scores.

    Every point of every FPN level distils the teacher's sigmoid class scores (quality-aware in GFL: ``σ`` is the
    predicted IoU) with the quality focal loss taking the teacher's scores as soft targets — mmdet's
    ``quality_focal_loss_tensor_target`` (``mmdet/models/losses/gfocal_loss.py``, v3.2.0), the classification KD
    the LD paper's extension (Zheng et al., TPAMI 2023, "Localization Distillation for Object Detection") pairs with
    LD on GFL students. Normalised like the task's QFL: summed over points and classes, divided by the number of
    ATSS positives (at least 1). The loss function is :func:`kdforge.losses.detection.class_kd_loss`. On the
    ``oriented_detection`` task (the class-KD baseline of the oriented results table) it runs unchanged: that task's
    ``flatten`` and ``assign`` give the same class logits and positives.

    Args:
        student: the GFL student.
        teacher: the frozen GFL teacher (same classes, strides and input size).
        temperature: T (1, as the mmdet function, which has none).
        beta: focusing exponent (GFL: 2; 0 gives plain sigmoid BCE-KD).
        kd_weight: w (1, the task QFL's weight).
    """

    family = "dense"
    paper = "Zheng et al., Localization Distillation for Object Detection (TPAMI 2023), class-score KD with QFL"
    summary = "teacher sigmoid class scores as soft QFL targets on every point"
    tasks = ("detection", "oriented_detection")
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        beta: float = 2.0,
        kd_weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or beta < 0 or kd_weight < 0:
            raise ValueError(f"need temperature > 0, beta >= 0, kd_weight >= 0, got {temperature}, {beta}, {kd_weight}")
        self.temperature, self.beta, self.kd_weight = temperature, beta, kd_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        task = self.task
        out = task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_flat = task.flatten(self.teacher(batch.input))
        targets = batch.task_targets
        parts = task.loss(out, targets)
        flat = task.flatten(out)
        num_pos = task.assign(flat, targets).pos_mask.sum().float().clamp(min=1.0)
        kd = class_kd_loss(flat.cls_logits.flatten(0, 1), t_flat.cls_logits.flatten(0, 1), self.temperature, self.beta)
        parts["cls_kd"] = self.kd_weight * kd.sum() / num_pos
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

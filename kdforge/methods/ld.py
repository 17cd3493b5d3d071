"""Localization distillation (LD) for GFL detectors."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.detection import ld_loss, ld_vlr_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("ld")
class LD(Method):
    """``L = L_GFL(s) + L_LD + L_VLR``: KL between the teacher's and the student's edge distributions.

    Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022, as mmdet ``LDHead``
    (``mmdet/models/dense_heads/ld_head.py``) with the valuable localisation region of HikariTJU/LD (``loss_ld_neg``);
    formulas and weights in docs/methods/ld.md. ``L_LD`` (:func:`kdforge.losses.detection.ld_loss`) runs on the
    ATSS positives of the task's own assignment (:meth:`DetectionTask.assign`, the one its GFL loss uses), each
    weighted by the student's max class score (detached); ``L_VLR`` (:func:`~kdforge.losses.detection.ld_vlr_loss`)
    on the region of :meth:`DetectionTask.valuable_region`, each point weighted by its anchor IoU.

    Args:
        student: the GFL student.
        teacher: the frozen GFL teacher (same ``reg_max``, strides and input size).
        temperature: τ (LD: 10).
        ld_weight: weight of ``L_LD`` (LD: 0.25).
        vlr_weight: weight of ``L_VLR`` (LD: 0.25 × 0.25; 0 turns the region off).
        alpha: lower bound of the region relative to the ATSS threshold (LD: 0.25).
    """

    family = "dense"
    paper = "Zheng et al., Localization Distillation for Dense Object Detection (CVPR 2022)"
    summary = "KL of the edge distributions on ATSS positives and the valuable localisation region"
    tasks = ("detection",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 10.0,
        ld_weight: float = 0.25,
        vlr_weight: float = 0.0625,
        alpha: float = 0.25,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or ld_weight < 0 or vlr_weight < 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"need temperature > 0, ld_weight >= 0, vlr_weight >= 0 and alpha in [0, 1], got {temperature}, "
                f"{ld_weight}, {vlr_weight}, {alpha}"
            )
        self.temperature, self.ld_weight, self.vlr_weight, self.alpha = temperature, ld_weight, vlr_weight, alpha

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        task = self.task
        out = task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_flat = task.flatten(self.teacher(batch.input))
        targets = batch.task_targets
        parts = task.loss(out, targets)
        flat = task.flatten(out)
        pos = task.assign(flat, targets).pos_mask
        weight = flat.cls_logits.detach().sigmoid().amax(dim=-1)[pos]
        parts["ld"] = ld_loss(flat.edge_logits[pos], t_flat.edge_logits[pos], weight, self.temperature, self.ld_weight)
        if self.vlr_weight > 0:
            region = task.valuable_region(flat, targets, self.alpha)
            parts["ld_vlr"] = ld_vlr_loss(
                flat.edge_logits, t_flat.edge_logits, region, self.temperature, self.vlr_weight
            )
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

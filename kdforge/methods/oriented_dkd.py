"""Discretized and decoupled KD for oriented detectors (reconstructed, docs/methods/oriented_dkd.md)."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.oriented import decoupled_kd_rows
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("oriented_dkd")
class OrientedDKD(Method):
    """``L = L_task(s) + w(e) · (λ_cls · L_cls + λ_loc · L_loc)``: DKD's target / non-target decoupling on the class
    scores and on every discretized localisation distribution of an oriented GFL student.

    A reconstruction of "Discretization and decoupled knowledge distillation for arbitrary oriented object
    detection" (Digital Signal Processing, 2024; only its title is known) from its two public ancestors: discretized
    box and angle distributions (GFL/DFL, Rotated-LD) and DKD (Zhao et al., CVPR 2022; mdistiller
    ``distillers/DKD.py``). Every choice is named in docs/methods/oriented_dkd.md. On the ATSS positives of the
    task's own assignment, with :func:`~kdforge.losses.oriented.decoupled_kd_rows` (``α·TCKD + β·NCKD``, ``τ²``):

    - ``L_cls``: DKD of the class logits (softmax over the classes), the gt class as the target class;
    - ``L_loc``: DKD of each side-distance distribution and of the angle distribution, the bin nearest the
      regression target (in bins, ``floor(y + 0.5)``) as the target class; a positive's five terms are averaged;
    - both summed over positives and divided by their number (at least 1);
    - ``w(e) = min((epoch + 1) / warmup_epochs, 1)``, DKD's linear warm-up.

    Args:
        student: the oriented GFL student.
        teacher: the frozen oriented GFL teacher (same ``reg_max``, ``angle_bins``, strides and input size).
        alpha, beta, temperature: DKD's TCKD and NCKD weights and τ on the class scores (DKD CIFAR-100: 1, 8, 4).
        loc_alpha, loc_beta, loc_temperature: the same on the localisation distributions (1, 8, and Rotated-LD's
            distribution temperature 5).
        cls_weight, loc_weight: λ_cls, λ_loc. λ_loc 0.2, not 1: at 1 the localisation term (τ_loc² · (α + β) on five
            distributions) started ~17x the task loss on the CIFAR-10 OBB proxy and collapsed two of three students;
            0.2 starts it where Rotated-LD's authors' weights start the same distributions (oriented_dkd.md).
        warmup_epochs: epochs of the warm-up (0 = none).
    """

    family = "dense"
    exact = False
    paper = "Discretization and decoupled KD for arbitrary oriented object detection (DSP 2024), reconstructed"
    summary = "DKD's target/non-target split on class scores and on the side and angle distributions (target bin)"
    tasks = ("oriented_detection",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        loc_alpha: float = 1.0,
        loc_beta: float = 8.0,
        loc_temperature: float = 5.0,
        cls_weight: float = 1.0,
        loc_weight: float = 0.2,
        warmup_epochs: float = 2.0,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or loc_temperature <= 0:
            raise ValueError(f"temperatures must be positive, got {temperature} and {loc_temperature}")
        if min(alpha, beta, loc_alpha, loc_beta, cls_weight, loc_weight, warmup_epochs) < 0:
            raise ValueError("alpha, beta, loc_alpha, loc_beta, cls_weight, loc_weight and warmup_epochs must be >= 0")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.loc_alpha, self.loc_beta, self.loc_temperature = loc_alpha, loc_beta, loc_temperature
        self.cls_weight, self.loc_weight, self.warmup_epochs = cls_weight, loc_weight, warmup_epochs

    def warmup_factor(self, progress: Progress) -> float:
        if self.warmup_epochs == 0:
            return 1.0
        return min((progress.epoch + 1) / self.warmup_epochs, 1.0)

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        task = self.task
        out = task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_flat = task.flatten(self.teacher(batch.input))
        targets = batch.task_targets
        parts = task.loss(out, targets)
        flat = task.flatten(out)
        a = task.assign(flat, targets)
        pos = a.pos_mask
        num_pos = pos.sum().float().clamp(min=1.0)
        edge_t, angle_t = task.regression_targets(flat, a)
        cls = decoupled_kd_rows(
            flat.cls_logits[pos], t_flat.cls_logits[pos], a.labels[pos], self.alpha, self.beta, self.temperature
        )
        edges_s, edges_t = flat.edge_logits[pos], t_flat.edge_logits[pos]
        bins = edges_s.shape[-1]
        side = decoupled_kd_rows(
            edges_s.reshape(-1, bins), edges_t.reshape(-1, bins), torch.floor(edge_t + 0.5).long().reshape(-1),
            self.loc_alpha, self.loc_beta, self.loc_temperature,
        ).reshape(-1, 4)  # fmt: skip
        angle_bins = flat.angle_logits.shape[-1] - 1
        angle = decoupled_kd_rows(
            flat.angle_logits[pos], t_flat.angle_logits[pos], torch.floor(angle_t + 0.5).long().clamp(max=angle_bins),
            self.loc_alpha, self.loc_beta, self.loc_temperature,
        )  # fmt: skip
        w = self.warmup_factor(progress)
        parts["dkd_cls"] = w * self.cls_weight * cls.sum() / num_pos
        parts["dkd_loc"] = w * self.loc_weight * ((side.sum(dim=1) + angle) / 5.0).sum() / num_pos
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

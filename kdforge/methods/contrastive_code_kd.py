"""CRD-style contrastive knowledge distillation on hash codes, with in-batch negatives."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.hashing import contrastive_code_kd, relaxed_codes
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.models.dense.hashing import binary_codes
from kdforge.registry import METHODS


@METHODS.register("contrastive_code_kd")
class ContrastiveCodeKD(Method):
    """``L = L_CIBHash(s) + w·½·Σ_{v ∈ {i, j}} InfoNCE(c_s,v, t_v; τ)``: each student code must pick its own teacher
    code of the same view among the batch's teacher codes (:func:`kdforge.losses.hashing.contrastive_code_kd`,
    both directions averaged with ``symmetric``).

    CRD's idea (Tian et al., "Contrastive Representation Distillation", ICLR 2020) on codes, with the batch as the
    negative set and the softmax cross-entropy instead of CRD's memory bank and NCE (docs/methods/
    contrastive_code_kd.md says why). Under DDP the negatives are the rank's own batch.

    Args:
        student: the student hasher.
        teacher: the frozen teacher hasher with the same ``bits``.
        temperature: τ (CIBHash's 0.3).
        symmetric: add the teacher-anchored direction.
        relaxation: the student's codes, ``"ste"`` (straight-through ``±1``) or ``"tanh"``.
        kd_weight: ``w``.
    """

    family = "dense"
    paper = "Tian et al., Contrastive Representation Distillation (ICLR 2020), on hash codes with in-batch negatives"
    summary = "InfoNCE between student and teacher hash codes of both views (in-batch negatives), plus CIBHash"
    exact = False
    tasks = ("hashing",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 0.3,
        symmetric: bool = True,
        relaxation: Literal["ste", "tanh"] = "ste",
        kd_weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or kd_weight < 0 or relaxation not in ("ste", "tanh"):
            raise ValueError(
                f"need temperature > 0, kd_weight >= 0, relaxation ste|tanh; got {temperature}, {kd_weight}"
            )
        self.temperature, self.symmetric, self.relaxation, self.kd_weight = (
            temperature,
            symmetric,
            relaxation,
            kd_weight,
        )

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        h_i, h_j = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_i, t_j = (binary_codes(t) for t in self.task.train_outputs(self.teacher, batch.input))
        parts = self.task.loss((h_i, h_j), batch.task_targets)
        s_i, s_j = relaxed_codes(h_i, self.relaxation), relaxed_codes(h_j, self.relaxation)
        kd = contrastive_code_kd(s_i, t_i, self.temperature, self.symmetric) + contrastive_code_kd(
            s_j, t_j, self.temperature, self.symmetric
        )
        parts["contrastive_kd"] = self.kd_weight * kd / 2
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)


__all__ = ["ContrastiveCodeKD"]

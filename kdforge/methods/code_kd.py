"""Code-matching knowledge distillation for deep hashing: the student's codes regress the teacher's."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.hashing import code_matching_loss, relaxed_codes
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.models.dense.hashing import binary_codes
from kdforge.registry import METHODS


@METHODS.register("code_kd")
class CodeKD(Method):
    """``L = L_CIBHash(s) + w·½·Σ_{v ∈ {i, j}} D(c_s,v, t_v)``: the student's own unsupervised hashing loss plus the
    distance of its codes to the teacher's ``±1`` codes of the same view.

    ``D`` is the mean squared error (``kind="mse"``; between ``±1`` codes, ``4/b`` × the Hamming distance) or one minus
    the cosine (``kind="cosine"``); :func:`kdforge.losses.hashing.code_matching_loss`. The student's codes are its
    straight-through binary codes (``relaxation="ste"``) or ``tanh(h/2)`` (``"tanh"``). docs/methods/code_kd.md.

    Args:
        student: the student hasher (``hash_<model>``).
        teacher: the frozen teacher hasher with the same ``bits``.
        kind: ``"mse"`` or ``"cosine"``.
        relaxation: ``"ste"`` or ``"tanh"``.
        kd_weight: ``w``.
    """

    family = "dense"
    paper = "code-matching KD on hash codes (generic baseline; hly1998/BRCD compares against this family)"
    summary = "MSE or cosine between student and teacher hash codes of both views, plus the CIBHash loss"
    tasks = ("hashing",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        kind: Literal["mse", "cosine"] = "mse",
        relaxation: Literal["ste", "tanh"] = "ste",
        kd_weight: float = 1.0,
    ) -> None:
        super().__init__(student, teacher)
        if kind not in ("mse", "cosine") or relaxation not in ("ste", "tanh") or kd_weight < 0:
            raise ValueError(f"need kind mse|cosine, relaxation ste|tanh, kd_weight >= 0; got {kind}, {relaxation}")
        self.kind, self.relaxation, self.kd_weight = kind, relaxation, kd_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        h_i, h_j = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_i, t_j = (binary_codes(t) for t in self.task.train_outputs(self.teacher, batch.input))
        parts = self.task.loss((h_i, h_j), batch.task_targets)
        s_i, s_j = relaxed_codes(h_i, self.relaxation), relaxed_codes(h_j, self.relaxation)
        kd = (code_matching_loss(s_i, t_i, self.kind) + code_matching_loss(s_j, t_j, self.kind)) / 2
        parts["code_kd"] = self.kd_weight * kd
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)


__all__ = ["CodeKD"]

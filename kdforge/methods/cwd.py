"""Channel-wise distillation (CWD) for dense prediction."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.dense import cwd_loss, match_size
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("cwd")
class CWD(Method):
    """``L = L_task(s) + α·τ²/(N·C)·Σ_{n,c} KL(softmax_HW(t_nc/τ) ‖ softmax_HW(s_nc/τ))`` on the segmentation logits.

    Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021; the loss is exact against
    mmrazor ``losses/cwd.py`` (golden test in tests/test_segmentation_losses.py). As in mmrazor's PSPNet config, it
    reads the decode head's classifier output before upsampling (``seg_logits``); the student's map is resized
    bilinearly to the teacher's when their output strides differ.

    Args:
        student: the segmentation student.
        teacher: the frozen segmentation teacher.
        temperature: τ (1, as mmrazor's Cityscapes PSPNet-R101 → R18 config).
        kd_weight: α (5, that config's ``loss_weight``).
    """

    family = "dense"
    paper = "Shu et al., Channel-wise Knowledge Distillation for Dense Prediction (ICCV 2021)"
    summary = "each channel's spatial map as a distribution at τ; KL teacher → student"
    tasks = ("segmentation",)
    standard_pairs = False

    def __init__(
        self, student: nn.Module, teacher: nn.Module, temperature: float = 1.0, kd_weight: float = 5.0
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or kd_weight < 0:
            raise ValueError(f"need temperature > 0 and kd_weight >= 0, got {temperature}, {kd_weight}")
        self.temperature, self.kd_weight = temperature, kd_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        out = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t = self.teacher.forward_features(batch.input)
        parts = self.task.loss(out, batch.task_targets)
        s_maps = match_size(out.seg_logits, t.seg_logits)
        parts["cwd"] = self.kd_weight * cwd_loss(s_maps, t.seg_logits, self.temperature)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

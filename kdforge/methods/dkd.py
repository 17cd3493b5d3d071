"""Decoupled knowledge distillation."""

from __future__ import annotations

import math

from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import LogitNorm, cross_entropy, dkd_loss, normalize_logits
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS


@METHODS.register("dkd")
class DKD(Method):
    """``L = γ·CE(z_s, y) + min(epoch/warmup, 1)·(α·TCKD + β·NCKD)``.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; checked against mdistiller ``distillers/DKD.py``
    and ``engine/cfg.py``. Defaults are the CIFAR-100 setting (CE 1, α 1, β 8, τ 4, warm-up 20 epochs); β is 2 for
    the resnet56/resnet110 teachers and 6 for wrn_40_2/vgg13 in the reference configs; ImageNet R34→R18 uses
    α 1, β 0.5, τ 1, warm-up 1. The warm-up factor follows the reference's 1-based epoch counter:
    ``min((epoch + 1)/warmup, 1)`` during 0-based epoch ``epoch``. With ``logit_norm=zscore`` this is DKD+LS
    (Sun et al., CVPR 2024: α and β ×9, τ 2).

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        ce_weight: γ.
        alpha: TCKD weight.
        beta: NCKD weight.
        temperature: τ.
        warmup_epochs: epochs of the linear warm-up of the DKD term (0 = none).
        logit_norm: ``none``, ``zscore`` or ``layernorm`` applied to both logits first.
        ln_scale: κ of ``layernorm``.
    """

    family = "logit"
    paper = "Zhao et al., Decoupled Knowledge Distillation (CVPR 2022)"
    summary = "KD split into target-class (TCKD) and non-target (NCKD) terms with free weights"
    teacher_cacheable = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        ce_weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: float = 20.0,
        logit_norm: LogitNorm = "none",
        ln_scale: float = math.pi,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if min(ce_weight, alpha, beta, warmup_epochs) < 0:
            raise ValueError("ce_weight, alpha, beta and warmup_epochs must be >= 0")
        self.ce_weight, self.alpha, self.beta = ce_weight, alpha, beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.logit_norm, self.ln_scale = logit_norm, ln_scale

    def warmup_factor(self, progress: Progress) -> float:
        if self.warmup_epochs == 0:
            return 1.0
        return min((progress.epoch + 1) / self.warmup_epochs, 1.0)

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        logits_t = self.teacher_outputs(batch)
        logits_s = self.student(batch.input)
        ce = self.ce_weight * cross_entropy(logits_s, batch.target)
        n_s = normalize_logits(logits_s, self.logit_norm, self.ln_scale)
        n_t = normalize_logits(logits_t, self.logit_norm, self.ln_scale)
        dkd = self.warmup_factor(progress) * dkd_loss(n_s, n_t, batch.target, self.alpha, self.beta, self.temperature)
        return StepOutput(loss=ce + dkd, losses={"ce": ce, "dkd": dkd}, logits=logits_s)

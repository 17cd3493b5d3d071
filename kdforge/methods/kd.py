"""Hinton knowledge distillation."""

from __future__ import annotations

import math

from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import LogitNorm, cross_entropy, kd_loss, normalize_logits
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS


@METHODS.register("kd")
class KD(Method):
    """``L = γ·CE(z_s, y) + α·τ²·KL(p(z_t; τ) ‖ p(z_s; τ))``.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015. Defaults are the
    CIFAR-100 benchmark setting (RepDistiller ``-r 0.1 -a 0.9``, ``kd_T=4``; mdistiller ``KD.CE_WEIGHT=0.1``,
    ``KD.KD_WEIGHT=0.9``, ``KD.TEMPERATURE=4``); ImageNet R34→R18 uses τ=1, CE 0.5, KD 0.5.

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        temperature: softmax temperature τ > 0.
        ce_weight: γ, weight of the cross-entropy on the labels.
        kd_weight: α, weight of the τ²-scaled KL term.
        logit_norm: normalize both logits before the softmax: ``zscore`` (logit standardization, Sun et al. CVPR
            2024), ``layernorm`` (SHAKE's ``LN(z)·κ``) or ``none`` (Hinton).
        ln_scale: κ of ``layernorm``.
    """

    family = "logit"
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network (2015)"
    summary = "soft targets: τ²·KL between temperature-scaled teacher and student distributions"
    teacher_cacheable = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        logit_norm: LogitNorm = "none",
        ln_scale: float = math.pi,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if ce_weight < 0 or kd_weight < 0:
            raise ValueError(f"ce_weight and kd_weight must be >= 0, got {ce_weight}, {kd_weight}")
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.logit_norm = logit_norm
        self.ln_scale = ln_scale

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        logits_t = self.teacher_outputs(batch)
        logits_s = self.student(batch.input)
        ce = self.ce_weight * cross_entropy(logits_s, batch.target)
        n_s = normalize_logits(logits_s, self.logit_norm, self.ln_scale)
        n_t = normalize_logits(logits_t, self.logit_norm, self.ln_scale)
        kd = self.kd_weight * kd_loss(n_s, n_t, self.temperature)
        return StepOutput(loss=ce + kd, losses={"ce": ce, "kd": kd}, logits=logits_s)


@METHODS.register("ls_kd")
class LSKD(KD):
    """KD on standardized logits: ``KD(Z(z_s), Z(z_t))`` with ``Z(z) = (z − mean)/std`` per sample.

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024; checked against
    sunshangquan/logit-standardization-KD (``mdistiller/distillers/KD.py``, ``normalize``). The same transform is
    available to every logit method as ``logit_norm=zscore``; this entry only carries the paper's CIFAR defaults:
    base temperature 2, KD weight 9, CE weight 0.1 (ImageNet R34→R18: CE 1.0, KD 9, τ 2).
    """

    paper = "Sun et al., Logit Standardization in Knowledge Distillation (CVPR 2024)"
    summary = "KD on z-scored logits (per-sample temperature)"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 2.0,
        ce_weight: float = 0.1,
        kd_weight: float = 9.0,
        logit_norm: LogitNorm = "zscore",
        ln_scale: float = math.pi,
    ) -> None:
        super().__init__(student, teacher, temperature, ce_weight, kd_weight, logit_norm, ln_scale)

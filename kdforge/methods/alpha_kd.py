"""Knowledge distillation with an α-divergence in place of the KL."""

from __future__ import annotations

import math

from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import AlphaMode, LogitNorm, alpha_kd_loss, cross_entropy, normalize_logits
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS


@METHODS.register("alpha_kd")
class AlphaKD(Method):
    """``L = γ·CE(z_s, y) + λ·τ²·D(p_t ‖ p_s)`` with ``D`` AlphaNet's adaptive α-divergence or a fixed-α one.

    Wang et al., "AlphaNet: Improved Training of Supernets with Alpha-Divergence", ICML 2021; the divergence and its
    gradient are checked against facebookresearch/AlphaNet ``loss_ops.py`` (``AdaptiveLossSoft``, α− = −1, α+ = 1,
    importance-weight clip 5). AlphaNet distills a supernet into its sub-networks; here the same loss is used
    between a pretrained teacher and a student (it is ATF's student term with the teacher frozen).

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        temperature: τ.
        ce_weight: γ.
        kd_weight: λ.
        divergence: ``adaptive`` (per-sample max of D_{α−}, D_{α+}) or ``fixed``.
        alpha: α of the fixed mode.
        alpha_min, alpha_max: α− and α+ of the adaptive mode.
        iw_clip: importance-weight clamp (``None`` = none).
        logit_norm: ``none``, ``zscore`` or ``layernorm`` applied to both logits first.
        ln_scale: κ of ``layernorm``.
    """

    family = "logit"
    paper = "Wang et al., AlphaNet: Improved Training of Supernets with Alpha-Divergence (ICML 2021)"
    summary = "KD with the adaptive (or a fixed) α-divergence instead of the KL"
    teacher_cacheable = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        divergence: AlphaMode = "adaptive",
        alpha: float = 0.5,
        alpha_min: float = -1.0,
        alpha_max: float = 1.0,
        iw_clip: float | None = 5.0,
        logit_norm: LogitNorm = "none",
        ln_scale: float = math.pi,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if min(ce_weight, kd_weight) < 0:
            raise ValueError("ce_weight and kd_weight must be >= 0")
        if iw_clip is not None and iw_clip <= 0:
            raise ValueError(f"iw_clip must be positive or null, got {iw_clip}")
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight
        self.divergence, self.alpha, self.alpha_min, self.alpha_max = divergence, alpha, alpha_min, alpha_max
        self.iw_clip = iw_clip
        self.logit_norm, self.ln_scale = logit_norm, ln_scale

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        logits_t = self.teacher_outputs(batch)
        logits_s = self.student(batch.input)
        ce = self.ce_weight * cross_entropy(logits_s, batch.target)
        n_s = normalize_logits(logits_s, self.logit_norm, self.ln_scale)
        n_t = normalize_logits(logits_t, self.logit_norm, self.ln_scale)
        kd = self.kd_weight * alpha_kd_loss(
            n_s, n_t, self.temperature, self.divergence, self.alpha, self.alpha_min, self.alpha_max, self.iw_clip
        )
        return StepOutput(loss=ce + kd, losses={"ce": ce, "kd": kd}, logits=logits_s)

"""Cosine confidence distillation (CCD) and KD with joint data augmentation (JDA), on dual-view batches."""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import ccd_soft_loss, cross_entropy, kd_loss
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS


def interleave_views(batch: Batch) -> tuple[Tensor, Tensor]:
    """``[orig_0, aug_0, orig_1, aug_1, ...]`` images ``[2B, C, H, W]`` and labels ``[2B]`` from a dual-view batch
    (the reference's layout: even rows original, odd rows augmented)."""
    if len(batch.views) != 1:
        raise ValueError(f"expected one augmented view per sample (data.views=jda), got {len(batch.views)}")
    x = torch.stack([batch.input, batch.views[0]], dim=1).flatten(0, 1)
    return x, batch.target.repeat_interleave(2)


class _DualViewMethod(Method):
    """``L = w_kd·[a·CE(z_s, y) + (1−a)·τ²·soft]`` over the interleaved ``2B`` images (the CCD code's expression).

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        temperature: τ.
        ce_ratio: a, the CE share.
        kd_weight: w_kd, the overall scale.
    """

    needs_views = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        ce_ratio: float = 0.5,
        kd_weight: float = 2.0,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= ce_ratio <= 1.0:
            raise ValueError(f"ce_ratio must be in [0, 1], got {ce_ratio}")
        if kd_weight < 0:
            raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")
        self.temperature, self.ce_ratio, self.kd_weight = temperature, ce_ratio, kd_weight

    @abc.abstractmethod
    def soft_loss(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        """The soft term on the interleaved ``[2B, C]`` logits, before ``τ²`` and the weights."""

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        x, y = interleave_views(batch)
        logits_t = self.teacher_logits(x)
        logits_s = self.student(x)
        ce = self.kd_weight * self.ce_ratio * cross_entropy(logits_s, y)
        soft = self.kd_weight * (1.0 - self.ce_ratio) * self.temperature**2 * self.soft_loss(logits_s, logits_t)
        return StepOutput(loss=ce + soft, losses={"ce": ce, "kd": soft}, logits=logits_s)


@METHODS.register("ccd")
class CCD(_DualViewMethod):
    """``L = w_kd·[a·CE(z_s, y) + (1−a)·τ²·(L_orig + L_aug)/2]`` on interleaved original/JDA views.

    Li et al., "What Role Does Data Augmentation Play in Knowledge Distillation?", ACCV 2022, and the Neurocomputing
    2024 extension; checked against liwei-group/CCD (``losses/SingleCCD.py``, ``C100/train_student_singleccd.py``).
    ``L_aug`` weights each augmented sample's KL by ``cos(z^T_o, z^T_a) + 1``. Defaults τ 4, a 0.5, w_kd 2; the
    reference adds no other CE term. Needs ``data.views=jda``.
    """

    family = "logit"
    paper = "Li et al., What Role Does Data Augmentation Play in KD? (ACCV 2022)"
    summary = "KD on original + JDA views, augmented views weighted by the teacher's cosine confidence"

    def soft_loss(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        return ccd_soft_loss(logits_s, logits_t, self.temperature)


@METHODS.register("kd_jda")
class KDJDA(_DualViewMethod):
    """The CCD paper's KD+JDA baseline: the same expression with plain KD over all 2B images (its ``losses/KD.py``)."""

    family = "logit"
    paper = "Li et al., What Role Does Data Augmentation Play in KD? (ACCV 2022)"
    summary = "Hinton KD on original + JDA views"

    def soft_loss(self, logits_s: Tensor, logits_t: Tensor) -> Tensor:
        # kd_loss already carries τ²; the shared expression applies it once, so divide it back out.
        return kd_loss(logits_s, logits_t, self.temperature) / self.temperature**2

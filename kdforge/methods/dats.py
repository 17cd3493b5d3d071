"""DATS: detail attention sampling with a teacher–student network (reconstructed)."""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import cross_entropy, kd_loss
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.models.attention_sampled import AttentionSampledNet
from kdforge.models.features import pooled_dim, read_features
from kdforge.registry import METHODS


@METHODS.register("dats")
class DATS(Method):
    """``L = CE(s(x_s)) + γ_g·CE(s(x)) + γ_t·CE(t(x_d)) + α·τ²·KL(p_t(x_d; τ) ‖ p_s(x_s; τ))
    + β·‖n(A·f_s) − n(f_t)‖²``.

    Reconstructed from the abstract of "A remote sensing image classification method based on detail attention
    sampling and a teacher–student network" (DATS), on the design it follows, TASN (Zheng et al., CVPR 2019, code
    researchmm/tasn). The student (an :class:`AttentionSampledNet`, e.g. ``dats_resnet8``) glances at the image
    ``x``; trilinear attention on its last map gives a structure map (channel sum) and a detail map (one random
    channel per sample); ``x_s`` and ``x_d`` are ``x`` resampled through them. The student classifies ``x_s`` through
    its detail refiner; a trainable copy of the pretrained teacher classifies the detail-preserving ``x_d`` and is
    fine-tuned on it; the teacher's fine-grained knowledge reaches the student as soft targets at TASN's
    part-to-master temperature and as a match of pooled features through a linear adapter ``A`` (``n`` = L2
    normalisation). Every choice is listed in docs/methods/dats.md.

    Args:
        student: an attention-sampled network (``model.name: dats_resnet8`` / ``dats_resnet20`` / ``dats_resnet8x4``).
        teacher: the pretrained teacher; a trainable copy becomes the detail teacher.
        temperature: τ of the soft targets (TASN distils part-net into master-net at 10).
        kd_weight: α.
        glance_weight: γ_g, CE of the glance pass (TASN weights its attention network's CE by 0.2).
        teacher_ce_weight: γ_t, CE of the detail teacher on detail images (0 freezes its objective to distillation
            only, with ``teacher_lr_scale=0`` it is not tuned at all).
        feature_weight: β, the pooled-feature match.
        teacher_lr_scale: the detail teacher's learning rate as a multiple of the student's.
    """

    family = "attention"
    paper = "DATS: remote sensing classification with detail attention sampling and a teacher–student network"
    exact = False
    summary = "TASN attention sampling: detail-image teacher distils into the structure-image student"
    trains_teacher = True
    standard_pairs = False
    student_models = ("dats_resnet8", "dats_resnet20", "dats_resnet8x4")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 10.0,
        kd_weight: float = 1.0,
        glance_weight: float = 0.2,
        teacher_ce_weight: float = 1.0,
        feature_weight: float = 1.0,
        teacher_lr_scale: float = 0.1,
    ) -> None:
        super().__init__(student, teacher)
        if not isinstance(student, AttentionSampledNet):
            raise ValueError(
                "DATS trains an attention-sampled student: set model.name to dats_resnet8, dats_resnet20 or "
                "dats_resnet8x4"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        weights = (kd_weight, glance_weight, teacher_ce_weight, feature_weight, teacher_lr_scale)
        if min(weights) < 0:
            raise ValueError(
                "kd_weight, glance_weight, teacher_ce_weight, feature_weight and teacher_lr_scale must be >= 0"
            )
        self.temperature = temperature
        self.kd_weight, self.glance_weight = kd_weight, glance_weight
        self.teacher_ce_weight, self.feature_weight = teacher_ce_weight, feature_weight
        self.teacher_lr_scale = teacher_lr_scale
        self.detail_teacher = copy.deepcopy(teacher).requires_grad_(True)
        self.adapter = nn.Linear(pooled_dim(student), pooled_dim(teacher), bias=False)
        self.train()

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        net: AttentionSampledNet = self.student
        x, y = batch.input, batch.target
        glance = net.glance(x)
        structure, detail = net.sampling_maps(glance)
        s = net.classify(net.resample(x, structure))
        t = read_features(self.detail_teacher, net.resample(x, detail))
        losses = {
            "ce": cross_entropy(s.logits, y),
            "glance_ce": self.glance_weight * cross_entropy(glance.logits, y),
            "teacher_ce": self.teacher_ce_weight * cross_entropy(t.logits, y),
            "kd": self.kd_weight * kd_loss(s.logits, t.logits.detach(), self.temperature),
            "feature": self.feature_weight
            * F.mse_loss(
                F.normalize(self.adapter(s.pooled).float(), dim=1), F.normalize(t.pooled.detach().float(), dim=1)
            ),
        }
        return StepOutput(loss=sum(losses.values()), losses=losses, logits=s.logits)

    def param_groups(self) -> list[dict[str, Any]]:
        teacher_ids = {id(p) for p in self.detail_teacher.parameters()}
        student = [p for p in self.trainable_parameters() if id(p) not in teacher_ids]
        groups = [{"name": "student", "params": student, "lr_scale": 1.0}]
        groups.append(
            {"name": "teacher", "params": list(self.detail_teacher.parameters()), "lr_scale": self.teacher_lr_scale}
        )
        return groups

    def exports(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.detail_teacher}

"""FitNets (hint learning)."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.adapters import ConvReg
from kdforge.data.batch import Batch
from kdforge.losses.feature import hint_loss
from kdforge.losses.logit import cross_entropy
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.models.features import feature_layout, read_features
from kdforge.registry import METHODS


def _resolve_layer(hint_layer: int | None, n: int, who: str) -> int:
    layer = n // 2 if hint_layer is None else hint_layer
    if not -n <= layer < n:
        raise ValueError(f"hint_layer {hint_layer} is out of range for the {who}'s {n} feature maps")
    return layer % n


@METHODS.register("fitnet")
class FitNet(Method):
    """``L = γ·CE(z_s, y) + β·MSE(r(F_s^g), F_t^h)``: single-stage FitNets as benchmarked.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015. The modern
    single-stage version of RepDistiller (``distiller_zoo/FitNet.py``, ``train_student.py --distill hint``) and
    mdistiller (``distillers/FitNet.py``): the student's guided map ``F_s^g`` passes the trainable regressor ``r``
    (:class:`ConvReg`) and is regressed onto the teacher's hint map ``F_t^h`` of the same index, post-ReLU. The
    paper's first stage (pre-training up to the guided layer) is not run, as in both references.

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        hint_layer: index into ``Features.feats`` (``[stem, stage1, ...]``) for both networks; ``None`` = each
            network's middle map ``len(feats) // 2``, which is 2 (the second stage) for every zoo model, the
            reference ``hint_layer=2``.
        ce_weight: γ.
        hint_weight: β (100 in RepDistiller and mdistiller).
        use_relu: end the regressor with ReLU, as the reference ``ConvReg`` does.
    """

    family = "feature"
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets (ICLR 2015)"
    summary = "hint learning: a regressor maps a student stage onto the teacher's, MSE between them"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        hint_layer: int | None = None,
        ce_weight: float = 1.0,
        hint_weight: float = 100.0,
        use_relu: bool = True,
    ) -> None:
        super().__init__(student, teacher)
        if ce_weight < 0 or hint_weight < 0:
            raise ValueError(f"ce_weight and hint_weight must be >= 0, got {ce_weight}, {hint_weight}")
        info_s, info_t = feature_layout(student), feature_layout(teacher)
        self.layer_s = _resolve_layer(hint_layer, len(info_s), "student")
        self.layer_t = _resolve_layer(hint_layer, len(info_t), "teacher")
        s, t = info_s[self.layer_s], info_t[self.layer_t]
        self.regressor = ConvReg(s.channels, t.channels, s.stride, t.stride, use_relu)
        self.ce_weight, self.hint_weight = ce_weight, hint_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        with torch.no_grad():
            hint = read_features(self.teacher, batch.input).feats[self.layer_t]
        feats_s = read_features(self.student, batch.input)
        guided = self.regressor(feats_s.feats[self.layer_s], (hint.shape[-2], hint.shape[-1]))
        ce = self.ce_weight * cross_entropy(feats_s.logits, batch.target)
        loss_hint = self.hint_weight * hint_loss(guided, hint)
        return StepOutput(loss=ce + loss_hint, losses={"ce": ce, "hint": loss_hint}, logits=feats_s.logits)


__all__ = ["FitNet"]

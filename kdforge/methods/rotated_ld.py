"""Rotated-LD: localization distillation of the box and angle distributions of an oriented detector."""

from __future__ import annotations

import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.oriented import imitation_loss, rotated_kd_loss, rotated_ld_loss
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("rotated_ld")
class RotatedLD(Method):
    """``L = L_task(s) + L_LD + L_KD + L_IM`` on an oriented GFL student (docs/methods/rotated_ld.md).

    Zheng et al., "Localization Distillation for Object Detection" (TPAMI 2023; its rotated-box code:
    Zzh-tju/Rotated-LD ``mmrotate/models/dense_heads/ld_rotate_retina_head.py``, ``LDRotatedRetinaHead``), checked
    against that code:

    - ``L_LD`` (:func:`~kdforge.losses.oriented.rotated_ld_loss`): ``T² · mean_bins KL`` of each of the five
      distributions (4 sides, angle) per point, weighted by the point's LD-region value (anchor IoU,
      :meth:`OrientedDetectionTask.ld_region`), divided per level by the number of region points;
    - ``L_KD`` (:func:`~kdforge.losses.oriented.rotated_kd_loss`): the same KL on the class logits, same weights;
    - ``L_IM`` (:func:`~kdforge.losses.oriented.imitation_loss`): MSE of the FPN feature vectors on the
      ``finegrained`` imitation region (:meth:`OrientedDetectionTask.imitation_region`), per level.

    Defaults are the reference's r18←r50 config (``rotated_retinanet_distribution_hbb_gwd_r18_r50_fpn_1x_dota_oc``:
    LD 30, KD 30, ``T`` 5, IM 2), the one with all three terms on; its r18←r34 configs use LD 10 / KD 20 (GWD) and
    LD 15 / KD 15 (KLD) with IM 0. When the student's FPN is narrower than the teacher's (Rotated-LD's pairs share a
    256-wide FPN), a 1×1 conv per level (trained with the student, not exported) maps it to the teacher's width for
    ``L_IM``; it exists only when ``im_weight > 0``.

    Args:
        student: the oriented GFL student.
        teacher: the frozen oriented GFL teacher (same ``reg_max``, ``angle_bins``, strides and input size).
        temperature: ``T`` of both KLs.
        ld_weight: weight of ``L_LD``.
        kd_weight: weight of ``L_KD``.
        im_weight: weight of ``L_IM`` (0 turns it off).
        alpha: the LD region's lower bound relative to the ATSS-style threshold (reference: 0.25).
    """

    family = "dense"
    paper = "Zheng et al., Localization Distillation for Object Detection (TPAMI 2023), Rotated-LD code"
    summary = "KL of the side and angle distributions and of the class logits on the LD region, feature imitation"
    tasks = ("oriented_detection",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 5.0,
        ld_weight: float = 30.0,
        kd_weight: float = 30.0,
        im_weight: float = 2.0,
        alpha: float = 0.25,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or min(ld_weight, kd_weight, im_weight) < 0 or not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"need temperature > 0, ld_weight, kd_weight, im_weight >= 0 and alpha in [0, 1], got {temperature}, "
                f"{ld_weight}, {kd_weight}, {im_weight}, {alpha}"
            )
        self.temperature, self.ld_weight, self.kd_weight = temperature, ld_weight, kd_weight
        self.im_weight, self.alpha = im_weight, alpha
        self.adapters = nn.ModuleList()
        if im_weight > 0:
            s_w = [info.channels for info in student.feature_info]
            t_w = [info.channels for info in teacher.feature_info]
            if len(s_w) != len(t_w):
                raise ValueError(f"Rotated-LD pairs FPN levels: the student has {len(s_w)}, the teacher {len(t_w)}")
            self.adapters.extend(nn.Conv2d(s, t, 1) if s != t else nn.Identity() for s, t in zip(s_w, t_w, strict=True))

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        task = self.task
        out = task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_out = self.teacher.forward_features(batch.input) if self.im_weight > 0 else self.teacher(batch.input)
            t_flat = task.flatten(t_out)
        targets = batch.task_targets
        parts = task.loss(out, targets)
        flat = task.flatten(out)
        region = task.ld_region(flat, targets, self.alpha)
        npl = flat.num_per_level
        parts["ld"] = rotated_ld_loss(
            [flat.edge_logits, flat.angle_logits.unsqueeze(2)],
            [t_flat.edge_logits, t_flat.angle_logits.unsqueeze(2)],
            region, npl, self.temperature, self.ld_weight,
        )  # fmt: skip
        parts["ld_kd"] = rotated_kd_loss(
            flat.cls_logits, t_flat.cls_logits, region, npl, self.temperature, self.kd_weight
        )
        if self.im_weight > 0:
            masks = task.imitation_region(flat, targets).split(npl, dim=1)
            s_feats = [adapt(f) for adapt, f in zip(self.adapters, out.feats, strict=True)]
            parts["ld_im"] = imitation_loss(s_feats, t_out.feats, list(masks), self.im_weight)
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

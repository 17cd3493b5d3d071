"""Oriented one-stage detectors: the GFL detector of :mod:`kdforge.models.dense.detection` with a fifth regression
target, the box angle, predicted like the four side distances as a discretized distribution.

Per point the head predicts class logits (quality-aware, as GFL), four side-distance distributions over
``reg_max + 1`` bins (left, top, right, bottom, measured in the box's own rotated frame, in strides: GFL's
``Integral`` decoding) and one angle distribution over ``angle_bins + 1`` bins spread evenly over the le90 range
``[-π/2, π/2]`` of :mod:`kdforge.ops.rotated`. Discretized box *and* angle distributions are Rotated-LD's head
(Zzh-tju/Rotated-LD ``mmrotate/models/dense_heads/rotated_retina_head_distribution.py``: ``(reg_max + 1) × 5``
logits per anchor, the angle with its own ``Integral_angle`` projection); here the head is anchor-free (one point per
location, GFL/ATSS) and the angle bins are angles in radians rather than Rotated-LD's encoded anchor deltas.

The angle branch is a 3×3 conv on the regression tower beside the distance branch, without the per-level learnable
scale (an angle does not grow with the level's stride). ``forward`` keeps static control flow and returns only raw
per-level tensors (traceable, exportable); decoding and rotated NMS live in
:meth:`kdforge.tasks.oriented.OrientedDetectionTask.predict`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from kdforge.models.dense.detection import GFLDetector, GFLHead


@dataclass
class OrientedFeatures:
    """What a distillation method may read from one oriented-detector forward pass.

    Attributes:
        feats: FPN outputs ``[B, C, H_l, W_l]`` per level (strides ``model.strides``).
        backbone_feats: the backbone's ``[stem, layer1, layer2, layer3]`` maps.
        cls_scores: per level ``[B, num_classes, H_l, W_l]`` classification logits (sigmoid = predicted IoU).
        bbox_preds: per level ``[B, 4 * (reg_max + 1), H_l, W_l]`` side-distance logits (l, t, r, b).
        angle_preds: per level ``[B, angle_bins + 1, H_l, W_l]`` angle logits.
    """

    feats: list[Tensor]
    backbone_feats: list[Tensor]
    cls_scores: list[Tensor]
    bbox_preds: list[Tensor]
    angle_preds: list[Tensor]


class OrientedGFLHead(GFLHead):
    """:class:`GFLHead` plus an angle-distribution branch on the regression tower.

    Args:
        num_classes, channels, num_levels, stacked_convs, reg_max: as :class:`GFLHead`.
        angle_bins: the angle distribution has ``angle_bins + 1`` bins.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        num_levels: int,
        stacked_convs: int = 2,
        reg_max: int = 16,
        angle_bins: int = 16,
    ) -> None:
        super().__init__(num_classes, channels, num_levels, stacked_convs, reg_max)
        self.angle_bins = angle_bins
        self.gfl_angle = nn.Conv2d(channels, angle_bins + 1, 3, padding=1)
        nn.init.normal_(self.gfl_angle.weight, std=0.01)
        nn.init.zeros_(self.gfl_angle.bias)

    def forward_oriented(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level ``(cls_scores, bbox_preds, angle_preds)``."""
        cls_scores, bbox_preds, angle_preds = [], [], []
        for feat, scale in zip(feats, self.scales, strict=False):
            reg = self.reg_convs(feat)
            cls_scores.append(self.gfl_cls(self.cls_convs(feat)))
            bbox_preds.append(scale(self.gfl_reg(reg)).float())
            angle_preds.append(self.gfl_angle(reg).float())
        return cls_scores, bbox_preds, angle_preds


class OrientedGFLDetector(GFLDetector):
    """CIFAR ResNet backbone + FPN + :class:`OrientedGFLHead`.

    Args:
        backbone, num_classes, fpn_channels, stacked_convs, reg_max: as :class:`GFLDetector`.
        angle_bins: bins of the angle distribution minus one.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        fpn_channels: int = 64,
        stacked_convs: int = 2,
        reg_max: int = 16,
        angle_bins: int = 16,
    ) -> None:
        super().__init__(backbone, num_classes, fpn_channels, stacked_convs, reg_max)
        if angle_bins < 1:
            raise ValueError(f"angle_bins must be >= 1, got {angle_bins}")
        self.angle_bins = angle_bins
        self.head = OrientedGFLHead(num_classes, fpn_channels, len(self.strides), stacked_convs, reg_max, angle_bins)

    def forward(self, x: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:  # type: ignore[override]
        """Args: ``x`` ``[B, 3, H, W]`` (H, W multiples of 16). Returns ``(cls_scores, bbox_preds, angle_preds)``:
        per level ``[B, C, H/s, W/s]``, ``[B, 4 * (reg_max + 1), H/s, W/s]`` and ``[B, angle_bins + 1, H/s, W/s]``."""
        cls_scores, bbox_preds, angle_preds = self.head.forward_oriented(self.fpn(self._backbone(x)[-1]))
        return tuple(cls_scores), tuple(bbox_preds), tuple(angle_preds)

    def forward_features(self, x: Tensor) -> OrientedFeatures:  # type: ignore[override]
        """The same computation as :meth:`forward`, also returning FPN and backbone maps."""
        backbone_feats = self._backbone(x)
        feats = self.fpn(backbone_feats[-1])
        cls_scores, bbox_preds, angle_preds = self.head.forward_oriented(feats)
        return OrientedFeatures(feats, backbone_feats, cls_scores, bbox_preds, angle_preds)


def _builder(backbone: str, fpn_channels: int) -> Callable[..., OrientedGFLDetector]:
    def build(
        num_classes: int = 10, reg_max: int = 16, angle_bins: int = 16, stacked_convs: int = 2
    ) -> OrientedGFLDetector:
        return OrientedGFLDetector(backbone, num_classes, fpn_channels, stacked_convs, reg_max, angle_bins)

    build.__name__ = f"ogfl_{backbone}"
    build.__doc__ = f"Oriented GFL detector on the CIFAR {backbone} backbone, FPN width {fpn_channels}."
    return build


#: oriented detector builders by name, used by :meth:`OrientedDetectionTask.build_model` (as ``DETECTION_MODELS``:
#: not in the global model registry); the widths are those of the ``gfl_*`` detectors of the same backbone
ORIENTED_MODELS: dict[str, Callable[..., OrientedGFLDetector]] = {
    "ogfl_resnet8": _builder("resnet8", 32),
    "ogfl_resnet20": _builder("resnet20", 48),
    "ogfl_resnet56": _builder("resnet56", 64),
    "ogfl_resnet8x4": _builder("resnet8x4", 64),
    "ogfl_resnet32x4": _builder("resnet32x4", 96),
}

__all__ = ["ORIENTED_MODELS", "OrientedFeatures", "OrientedGFLDetector", "OrientedGFLHead"]

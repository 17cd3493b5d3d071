"""One-stage anchor-free detectors: a small FPN and a GFL head over the CIFAR ResNet backbones of the zoo.

GFL: Li et al., "Generalized Focal Loss", NeurIPS 2020; head layout checked against mmdetection
``mmdet/models/dense_heads/gfl_head.py`` (separate classification and regression towers of 3×3 conv + GroupNorm +
ReLU shared across levels, a learnable scale per level on the regression output, the classification bias initialised
to a 0.01 prior, ``4 × (reg_max + 1)`` distribution logits per point).

The backbone runs the zoo's ``CifarResNet`` stages with the reference attribute names (``backbone.conv1``,
``backbone.layer1..3``), so a CIFAR classification checkpoint loads into it (without its ``fc``). The CIFAR stem keeps
full resolution and ``layer3`` has stride 4. The FPN takes ``layer3`` (stride 4), adds two stride-2 extra levels
(strides 8 and 16, RetinaNet's "extra convs on input"), and fuses them top-down with nearest upsampling before a
3×3 output conv per level: three levels of strides ``(4, 8, 16)``, which suit 16–64 px objects on a 96×96 canvas.

``forward`` has static control flow and returns only raw per-level tensors (traceable, exportable); decoding, NMS and
top-k live in :meth:`kdforge.tasks.detection.DetectionTask.predict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.cifar.resnet import CifarResNet
from kdforge.models.features import FeatureInfo

#: ``name -> (depth, [stem, stage1, stage2, stage3] channels)`` of the zoo's CIFAR ResNets usable as backbones
_BACKBONES: dict[str, tuple[int, list[int]]] = {
    "resnet8": (8, [16, 16, 32, 64]),
    "resnet20": (20, [16, 16, 32, 64]),
    "resnet56": (56, [16, 16, 32, 64]),
    "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}


@dataclass
class DetectionFeatures:
    """What a distillation method may read from one detector forward pass.

    Attributes:
        feats: FPN outputs ``[B, C, H_l, W_l]`` for each level (strides ``model.strides``), the maps PKD/FGD distil.
        backbone_feats: the backbone's ``[stem, layer1, layer2, layer3]`` maps.
        cls_scores: per level ``[B, num_classes, H_l, W_l]`` classification logits (quality-aware: sigmoid = IoU).
        bbox_preds: per level ``[B, 4 * (reg_max + 1), H_l, W_l]`` edge-distribution logits (l, t, r, b order).
    """

    feats: list[Tensor]
    backbone_feats: list[Tensor]
    cls_scores: list[Tensor]
    bbox_preds: list[Tensor]


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv ``Scale``), one per FPN level on the regression output."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _conv_gn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    groups = math.gcd(cout, 16)  # GFL: GN(32) at 256 channels; at 32-96 channels 16 groups keep >= 2 per group
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU()
    )


class SmallFPN(nn.Module):
    """Top-down FPN over one backbone map plus two stride-2 extra levels.

    Args:
        in_channels: channels of the backbone map (stride ``s``).
        channels: FPN width.

    Shapes: input ``[B, in_channels, H, W]``; outputs ``[B, channels, H, W]``, ``[.., H/2, W/2]``, ``[.., H/4, W/4]``
    (ceil division, as strided 3×3 convs with padding 1 give).
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(in_channels, channels, 1)
        self.extra1 = nn.Conv2d(in_channels, channels, 3, stride=2, padding=1)
        self.extra2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.out_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3))

    def forward(self, x: Tensor) -> list[Tensor]:
        p0 = self.lateral(x)
        p1 = self.extra1(x)
        p2 = self.extra2(F.relu(p1))
        # top-down: each level adds the upsampled coarser level (sizes taken from the maps: static under tracing)
        p1 = p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest")
        p0 = p0 + F.interpolate(p1, size=p0.shape[-2:], mode="nearest")
        return [conv(p) for conv, p in zip(self.out_convs, (p0, p1, p2), strict=False)]


class GFLHead(nn.Module):
    """GFL head shared over levels (mmdet ``GFLHead``).

    Args:
        num_classes: foreground classes (sigmoid outputs, no background channel).
        channels: input and tower width.
        num_levels: FPN levels (one learnable scale each).
        stacked_convs: conv + GN + ReLU layers in each tower (mmdet: 4; 2 here for CPU budgets).
        reg_max: the edge distribution has ``reg_max + 1`` bins (GFL default 16).
    """

    def __init__(self, num_classes: int, channels: int, num_levels: int, stacked_convs: int = 2, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.cls_convs = nn.Sequential(*[_conv_gn(channels, channels) for _ in range(stacked_convs)])
        self.reg_convs = nn.Sequential(*[_conv_gn(channels, channels) for _ in range(stacked_convs)])
        self.gfl_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        nn.init.zeros_(self.gfl_reg.bias)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_scores, bbox_preds = [], []
        for feat, scale in zip(feats, self.scales, strict=False):
            cls_scores.append(self.gfl_cls(self.cls_convs(feat)))
            bbox_preds.append(scale(self.gfl_reg(self.reg_convs(feat))).float())
        return cls_scores, bbox_preds


class GFLDetector(nn.Module):
    """CIFAR ResNet backbone + :class:`SmallFPN` + :class:`GFLHead`.

    Args:
        backbone: a key of ``_BACKBONES`` (``resnet8``, ``resnet20``, ``resnet56``, ``resnet8x4``, ``resnet32x4``).
        num_classes: foreground classes.
        fpn_channels: FPN and head width.
        stacked_convs: layers per head tower.
        reg_max: distribution bins minus one.

    Attributes:
        strides: the stride of each output level, ``(4, 8, 16)``.
        feature_info: one :class:`FeatureInfo` per FPN level (``p4, p8, p16``).
    """

    def __init__(
        self, backbone: str, num_classes: int, fpn_channels: int = 64, stacked_convs: int = 2, reg_max: int = 16
    ) -> None:
        super().__init__()
        if backbone not in _BACKBONES:
            raise ValueError(f"unknown detection backbone {backbone!r}; choose from {sorted(_BACKBONES)}")
        depth, filters = _BACKBONES[backbone]
        net = CifarResNet(depth, filters, num_classes=1)
        # keep only the stages: an unused classifier would hold parameters no loss reaches
        del net.fc, net.avgpool
        self.backbone = net
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = (4, 8, 16)
        self.fpn = SmallFPN(filters[3], fpn_channels)
        self.head = GFLHead(num_classes, fpn_channels, len(self.strides), stacked_convs, reg_max)
        self.feature_info = [FeatureInfo(f"p{s}", fpn_channels, s) for s in self.strides]

    def _backbone(self, x: Tensor) -> list[Tensor]:
        b = self.backbone
        stem = b.relu(b.bn1(b.conv1(x)))
        c1 = b.layer1(stem)
        c2 = b.layer2(c1)
        c3 = b.layer3(c2)
        return [stem, c1, c2, c3]

    def forward(self, x: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Args: ``x`` ``[B, 3, H, W]`` (H, W multiples of 16). Returns ``(cls_scores, bbox_preds)``: per level
        ``[B, num_classes, H/s, W/s]`` and ``[B, 4 * (reg_max + 1), H/s, W/s]`` for ``s`` in ``strides``."""
        cls_scores, bbox_preds = self.head(self.fpn(self._backbone(x)[-1]))
        return tuple(cls_scores), tuple(bbox_preds)

    def forward_features(self, x: Tensor) -> DetectionFeatures:
        """The same computation as :meth:`forward`, also returning FPN and backbone maps."""
        backbone_feats = self._backbone(x)
        feats = self.fpn(backbone_feats[-1])
        cls_scores, bbox_preds = self.head(feats)
        return DetectionFeatures(feats, backbone_feats, cls_scores, bbox_preds)


def _builder(backbone: str, fpn_channels: int) -> Callable[..., GFLDetector]:
    def build(num_classes: int = 10, reg_max: int = 16, stacked_convs: int = 2) -> GFLDetector:
        return GFLDetector(backbone, num_classes, fpn_channels, stacked_convs, reg_max)

    build.__name__ = f"gfl_{backbone}"
    build.__doc__ = f"GFL detector on the CIFAR {backbone} backbone, FPN width {fpn_channels}."
    return build


#: detector builders by name, used by :meth:`DetectionTask.build_model` (not in the global model registry)
DETECTION_MODELS: dict[str, Callable[..., GFLDetector]] = {
    "gfl_resnet8": _builder("resnet8", 32),
    "gfl_resnet20": _builder("resnet20", 48),
    "gfl_resnet56": _builder("resnet56", 64),
    "gfl_resnet8x4": _builder("resnet8x4", 64),
    "gfl_resnet32x4": _builder("resnet32x4", 96),
}

__all__ = ["DETECTION_MODELS", "DetectionFeatures", "GFLDetector", "GFLHead", "Scale", "SmallFPN"]

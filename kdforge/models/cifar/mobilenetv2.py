"""CIFAR MobileNetV2 ``mobile_half`` (expansion 6, width 0.5) of RepDistiller ``models/mobilenetv2.py``.

Layers and attribute names follow mdistiller's ``mdistiller/models/cifar/mobilenetv2.py`` (``conv1``,
``blocks.0..6``, ``conv2``, ``classifier.0``): a stride-2 3×3 stem, inverted residuals whose second group keeps
stride 1 (the CIFAR adaptation), and a 1×1 conv to 1280 channels before pooling. Every inverted residual has its
1×1 expansion conv, even with expansion 1 (unlike torchvision). Stage maps follow mdistiller: the stem and the
outputs of ``blocks[1]``, ``blocks[2]``, ``blocks[4]`` and ``blocks[6]``; blocks end linearly, so only the stem has
a distinct pre-activation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import KDModel
from kdforge.models.features import FeatureInfo, Features
from kdforge.registry import MODELS

# (expansion t, channels c, repeats n, first stride s); ``t=None`` rows take the network's expansion ``T``.
SETTING: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]
# Indices of ``blocks`` whose outputs are the stage maps (mdistiller's f1..f4).
STAGE_BLOCKS = (1, 2, 4, 6)


def conv_bn(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1×1 expand, 3×3 depthwise, 1×1 linear projection; identity shortcut when shape is kept.

    Args:
        inp: input channels.
        oup: output channels.
        stride: depthwise stride.
        expand_ratio: hidden width multiplier.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, inp, H, W]``. Returns ``[B, oup, H/stride, W/stride]``."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(KDModel):
    """MobileNetV2 for 32×32 inputs.

    Args:
        expansion: expansion ratio ``T`` of all but the first group.
        width_mult: channel multiplier.
        num_classes: classifier width.
    """

    classifier_name = "classifier"

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100) -> None:
        super().__init__(num_classes)
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        widths, strides, stride = [], [], 2
        for t, c, n, s in SETTING:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t or expansion))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
            stride *= s
            widths.append(output_channel)
            strides.append(stride)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.num_features = self.last_channel
        self.feature_info = [FeatureInfo("stem", int(32 * width_mult), 2)] + [
            FeatureInfo(f"blocks.{i}", widths[i], strides[i]) for i in STAGE_BLOCKS
        ]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns logits ``[B, num_classes]`` (the ops of ``forward_features``)."""
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.conv2(x), 1), 1))

    def forward_features(self, x: Tensor) -> Features:
        """Args: ``x`` ``[B, 3, 32, 32]``. Returns stem + four stage maps (strides 2, 2, 4, 8, 16)."""
        pre = self.conv1[1](self.conv1[0](x))
        out = F.relu(pre)
        feats, preacts = [out], [pre]
        for i, block in enumerate(self.blocks):
            out = block(out)
            if i in STAGE_BLOCKS:
                feats.append(out)
                preacts.append(out)
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.conv2(out), 1), 1)
        return Features(logits=self.classifier(pooled), feats=feats, preact_feats=preacts, pooled=pooled)


@MODELS.register("MobileNetV2", family="cifar", input_size=32, kind="mobilenet")
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """RepDistiller ``MobileNetV2`` / ``mobile_half``: expansion 6, width 0.5."""
    return MobileNetV2(6, 0.5, num_classes)


__all__ = ["SETTING", "InvertedResidual", "MobileNetV2"]

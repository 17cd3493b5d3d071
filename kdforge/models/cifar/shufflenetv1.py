"""CIFAR ShuffleNetV1 ``ShuffleV1`` (groups 3, widths 240/480/960) of RepDistiller ``models/ShuffleNetv1.py``.

Layers and attribute names follow mdistiller's ``mdistiller/models/cifar/ShuffleNetv1.py`` (``conv1, bn1,
layer1..3, linear``; blocks ``conv1, bn1, conv2, bn2, conv3, bn3``): a 1×1 stem at full resolution, three stages
that each start with a stride-2 block concatenating an average-pooled shortcut. The reference keeps PyTorch's
default initialisation, and so does this module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import KDModel, run_stem_and_stages
from kdforge.models.features import FeatureInfo, Features
from kdforge.registry import MODELS


class ShuffleBlock(nn.Module):
    """Channel shuffle ``[B, C, H, W] -> [B, g, C/g, H, W] -> transpose -> [B, C, H, W]``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1×1, shuffle, depthwise 3×3, grouped 1×1; added to (stride 1) or concatenated with (stride 2) the
    shortcut.

    Args:
        in_planes: input channels.
        out_planes: channels of the residual branch (the stride-2 output adds ``in_planes`` by concatenation).
        stride: 1 or 2.
        groups: group count of the 1×1 convolutions (1 for the first, on the 24-channel stem).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def preact(self, x: Tensor) -> Tensor:
        """Block output before the final ReLU."""
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return torch.cat([out, res], 1) if self.stride == 2 else out + res

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))


class ShuffleNetV1(KDModel):
    """ShuffleNetV1 for 32×32 inputs.

    Args:
        out_planes: stage widths.
        num_blocks: blocks per stage.
        groups: group count.
        num_classes: classifier width.
    """

    classifier_name = "linear"

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__(num_classes)
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.num_features = out_planes[2]
        self.feature_info = [FeatureInfo("stem", 24, 1)] + [
            FeatureInfo(f"layer{i + 1}", c, 2 ** (i + 1)) for i, c in enumerate(out_planes)
        ]

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The stride-2 block concatenates its input, so its own branch supplies only the remaining channels.
            branch = out_planes - self.in_planes if i == 0 else out_planes
            layers.append(Bottleneck(self.in_planes, branch, stride=2 if i == 0 else 1, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns logits ``[B, num_classes]`` (the ops of ``forward_features``)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward_features(self, x: Tensor) -> Features:
        """Args: ``x`` ``[B, 3, 32, 32]``. Returns stem + three stage maps (strides 1, 2, 4, 8)."""
        stages = (self.layer1, self.layer2, self.layer3)
        out, feats, preacts = run_stem_and_stages(self.bn1(self.conv1(x)), stages)
        pooled = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return Features(logits=self.linear(pooled), feats=feats, preact_feats=preacts, pooled=pooled)


@MODELS.register("ShuffleV1", family="cifar", input_size=32, kind="shufflenet")
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    """RepDistiller ``ShuffleV1``: groups 3, stage widths 240/480/960, blocks 4/8/4."""
    return ShuffleNetV1(num_classes=num_classes)


__all__ = ["Bottleneck", "ShuffleBlock", "ShuffleNetV1"]

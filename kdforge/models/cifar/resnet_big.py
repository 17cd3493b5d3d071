"""CIFAR ResNet18 / ResNet50 of RepDistiller ``models/resnetv2.py`` (mdistiller ``cifar/resnetv2.py``).

The ImageNet layout with a 3×3 stride-1 stem and no max-pool, so the four stages run at strides 1, 2, 4, 8 on
32×32 inputs. Attribute names follow the reference (``conv1, bn1, layer1..4, linear``; blocks with ``shortcut``
instead of torchvision's ``downsample``), so RepDistiller checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import KDModel, init_conv_bn, run_stem_and_stages
from kdforge.models.features import FeatureInfo, Features
from kdforge.registry import MODELS


def shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (an empty ``Sequential``) or 1×1 conv + BN when the residual shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions plus shortcut.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes, stride)

    def preact(self, x: Tensor) -> Tensor:
        """Residual sum before the final ReLU: ``[B, planes, H/stride, W/stride]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, plus shortcut.

    Args:
        in_planes: input channels.
        planes: bottleneck width (output is ``4 * planes``).
        stride: stride of the 3×3 convolution.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = shortcut(in_planes, self.expansion * planes, stride)

    def preact(self, x: Tensor) -> Tensor:
        """Residual sum before the final ReLU: ``[B, 4 * planes, H/stride, W/stride]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))


class CifarBigResNet(KDModel):
    """Four-stage ResNet for 32×32 inputs.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        num_blocks: blocks per stage.
        num_classes: classifier width.
    """

    classifier_name = "linear"

    def __init__(self, block: type[BasicBlock | Bottleneck], num_blocks: list[int], num_classes: int = 100) -> None:
        super().__init__(num_classes)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion
        self.feature_info = [FeatureInfo("stem", 64, 1)] + [
            FeatureInfo(f"layer{i + 1}", w * block.expansion, 2**i) for i, w in enumerate((64, 128, 256, 512))
        ]
        init_conv_bn(self)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns logits ``[B, num_classes]`` (the ops of ``forward_features``)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))

    def forward_features(self, x: Tensor) -> Features:
        """Args: ``x`` ``[B, 3, 32, 32]``. Returns stem + four stage maps (strides 1, 1, 2, 4, 8)."""
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        out, feats, preacts = run_stem_and_stages(self.bn1(self.conv1(x)), stages)
        pooled = torch.flatten(self.avgpool(out), 1)
        return Features(logits=self.linear(pooled), feats=feats, preact_feats=preacts, pooled=pooled)


@MODELS.register("ResNet18", family="cifar", input_size=32, kind="resnet")
def resnet18_cifar(num_classes: int = 100) -> CifarBigResNet:
    """RepDistiller ``ResNet18`` (basic blocks 2-2-2-2) for CIFAR."""
    return CifarBigResNet(BasicBlock, [2, 2, 2, 2], num_classes)


@MODELS.register("ResNet50", family="cifar", input_size=32, kind="resnet")
def resnet50_cifar(num_classes: int = 100) -> CifarBigResNet:
    """RepDistiller ``ResNet50`` (bottlenecks 3-4-6-3) for CIFAR."""
    return CifarBigResNet(Bottleneck, [3, 4, 6, 3], num_classes)


__all__ = ["BasicBlock", "Bottleneck", "CifarBigResNet"]

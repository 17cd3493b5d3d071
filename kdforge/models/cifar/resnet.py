"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) of RepDistiller ``models/resnet.py``.

Same layers and attribute names as RepDistiller's and mdistiller's ``mdistiller/models/cifar/resnet.py``
(``conv1, bn1, layer1..3, fc``; blocks ``conv1, bn1, conv2, bn2, downsample``), so their released teacher
checkpoints load with :func:`kdforge.models.load_weights`. The 3×3 stem keeps the 32×32 resolution, ``layer2`` and
``layer3`` halve it; global average pooling is adaptive (the reference's ``AvgPool2d(8)`` is the same at 32×32).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import KDModel, init_conv_bn, run_stem_and_stages
from kdforge.models.features import FeatureInfo, Features
from kdforge.registry import MODELS


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or 1×1 conv + BN) shortcut; torchvision's key names.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first convolution.
        downsample: shortcut projection when the shape changes.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def preact(self, x: Tensor) -> Tensor:
        """Residual sum before the final ReLU: ``[B, planes, H/stride, W/stride]``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + identity

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))


def make_downsample(inplanes: int, outplanes: int, stride: int) -> nn.Sequential | None:
    """1×1 conv + BN projection where the residual shape changes, ``None`` otherwise."""
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(outplanes),
    )


class CifarResNet(KDModel):
    """ResNet for 32×32 inputs with ``(depth - 2) / 6`` basic blocks per stage.

    Args:
        depth: ``6n + 2`` (8, 14, 20, 32, 44, 56, 110).
        num_filters: ``[stem, stage1, stage2, stage3]`` channels.
        num_classes: classifier width.
    """

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100) -> None:
        super().__init__(num_classes)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3], num_classes)
        self.num_features = num_filters[3]
        self.feature_info = [
            FeatureInfo("stem", num_filters[0], 1),
            FeatureInfo("layer1", num_filters[1], 1),
            FeatureInfo("layer2", num_filters[2], 2),
            FeatureInfo("layer3", num_filters[3], 4),
        ]
        init_conv_bn(self)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride, make_downsample(self.inplanes, planes, stride))]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns logits ``[B, num_classes]`` (the ops of ``forward_features``)."""
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).flatten(1))

    def forward_features(self, x: Tensor) -> Features:
        """Args: ``x`` ``[B, 3, 32, 32]``. Returns stem and three stage maps (strides 1, 1, 2, 4)."""
        stages = (self.layer1, self.layer2, self.layer3)
        out, feats, preacts = run_stem_and_stages(self.bn1(self.conv1(x)), stages)
        pooled = self.avgpool(out).flatten(1)
        return Features(logits=self.fc(pooled), feats=feats, preact_feats=preacts, pooled=pooled)


_SMALL = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]


def _register(name: str, depth: int, filters: list[int]) -> None:
    def factory(num_classes: int = 100) -> CifarResNet:
        return CifarResNet(depth, filters, num_classes)

    factory.__name__ = name
    factory.__doc__ = f"RepDistiller ``{name}``: depth {depth}, channels {filters}."
    MODELS.register(name, family="cifar", input_size=32, kind="resnet")(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, _SMALL)
_register("resnet8x4", 8, _X4)
_register("resnet32x4", 32, _X4)

__all__ = ["BasicBlock", "CifarResNet", "make_downsample"]

"""ImageNet ResNet-18/34/50 with torchvision's ``torchvision/models/resnet.py`` layout and state-dict keys.

``conv1`` (7×7, stride 2), ``bn1``, max-pool, ``layer1..4`` of ``BasicBlock``/``Bottleneck`` (``conv1, bn1,
conv2, bn2[, conv3, bn3], downsample.0/.1``) and ``fc``, so torchvision's released weights load with
:func:`kdforge.models.load_weights`. The bottleneck strides its 3×3 convolution (ResNet v1.5), as torchvision does.
The stem map is taken after the ReLU and before the max-pool (stride 2), as in mdistiller's ImageNet ResNet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import KDModel, init_conv_bn, run_stem_and_stages
from kdforge.models.cifar.resnet import BasicBlock, make_downsample
from kdforge.models.features import FeatureInfo, Features
from kdforge.registry import MODELS


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, with torchvision's key names.

    Args:
        inplanes: input channels.
        planes: bottleneck width (output is ``4 * planes``).
        stride: stride of the 3×3 convolution.
        downsample: shortcut projection when the shape changes.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def preact(self, x: Tensor) -> Tensor:
        """Residual sum before the final ReLU: ``[B, 4 * planes, H/stride, W/stride]``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))


class ImageNetResNet(KDModel):
    """ResNet for 224×224 inputs (any size ≥ 32 works: pooling is adaptive).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        num_classes: classifier width.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000) -> None:
        super().__init__(num_classes)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion
        self.feature_info = [FeatureInfo("stem", 64, 2)] + [
            FeatureInfo(f"layer{i + 1}", w * block.expansion, 4 * 2**i) for i, w in enumerate((64, 128, 256, 512))
        ]
        init_conv_bn(self)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        out = planes * block.expansion
        layers = [block(self.inplanes, planes, stride, make_downsample(self.inplanes, out, stride))]
        self.inplanes = out
        layers += [block(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns logits ``[B, num_classes]`` (the ops of ``forward_features``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_features(self, x: Tensor) -> Features:
        """Args: ``x`` ``[B, 3, 224, 224]``. Returns stem + four stage maps (strides 2, 4, 8, 16, 32)."""
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        out, feats, preacts = run_stem_and_stages(self.bn1(self.conv1(x)), stages, after_stem=self.maxpool)
        pooled = torch.flatten(self.avgpool(out), 1)
        return Features(logits=self.fc(pooled), feats=feats, preact_feats=preacts, pooled=pooled)


def _register(name: str, block: type[BasicBlock | Bottleneck], layers: list[int]) -> None:
    def factory(num_classes: int = 1000) -> ImageNetResNet:
        return ImageNetResNet(block, layers, num_classes)

    factory.__name__ = name
    factory.__doc__ = f"torchvision ``{name}``: {block.__name__} × {layers}."
    MODELS.register(name, family="imagenet", input_size=224, kind="resnet")(factory)


_register("resnet18", BasicBlock, [2, 2, 2, 2])
_register("resnet34", BasicBlock, [3, 4, 6, 3])
_register("resnet50", Bottleneck, [3, 4, 6, 3])

__all__ = ["Bottleneck", "ImageNetResNet"]

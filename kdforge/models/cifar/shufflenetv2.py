"""CIFAR ShuffleNetV2 ``ShuffleV2`` (net size 1: widths 116/232/464, 1024 before the head) of RepDistiller
``models/ShuffleNetv2.py``.

Layers and attribute names follow mdistiller's ``mdistiller/models/cifar/ShuffleNetv2.py`` (``conv1, bn1,
layer1..3, conv2, bn2, linear``): a 1×1 stem at full resolution, stages of one stride-2 ``DownBlock`` plus split
``BasicBlock``s, and a 1×1 conv to 1024 channels before pooling. PyTorch default initialisation, as in the reference.

``preact_feats`` of a stage is the last block's output with the ReLU of its branch removed, channel-shuffled like
the output itself (the reference returns it unshuffled), so ``relu(preact) == feat`` channel by channel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import KDModel, run_stem_and_stages
from kdforge.models.cifar.shufflenetv1 import ShuffleBlock
from kdforge.models.features import FeatureInfo, Features
from kdforge.registry import MODELS

CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class SplitBlock(nn.Module):
    """Splits channels into the first ``ratio`` and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Keeps half the channels, transforms the other half (1×1, depthwise 3×3, 1×1), concatenates and shuffles.

    Args:
        in_channels: input (= output) channels.
        split_ratio: fraction passed through unchanged.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(groups=2)

    def _branch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        return x1, self.bn3(self.conv3(out))

    def preact(self, x: Tensor) -> Tensor:
        """The output with the branch's final ReLU left out; the passed-through half is already non-negative."""
        x1, pre = self._branch(x)
        return self.shuffle(torch.cat([x1, pre], 1))

    def forward(self, x: Tensor) -> Tensor:
        x1, pre = self._branch(x)
        return self.shuffle(torch.cat([x1, F.relu(pre)], 1))


class DownBlock(nn.Module):
    """Stride-2 block: depthwise+pointwise left branch and pointwise+depthwise+pointwise right branch, concatenated.

    Args:
        in_channels: input channels.
        out_channels: output channels (half from each branch).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, in_channels, H, W]``. Returns ``[B, out_channels, H/2, W/2]``."""
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(KDModel):
    """ShuffleNetV2 for 32×32 inputs.

    Args:
        net_size: key of :data:`CONFIGS` (width multiplier).
        num_classes: classifier width.
    """

    classifier_name = "linear"

    def __init__(self, net_size: float = 1, num_classes: int = 100) -> None:
        super().__init__(num_classes)
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.num_features = out_channels[3]
        self.feature_info = [FeatureInfo("stem", 24, 1)] + [
            FeatureInfo(f"layer{i + 1}", c, 2 ** (i + 1)) for i, c in enumerate(out_channels[:3])
        ]

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns logits ``[B, num_classes]`` (the ops of ``forward_features``)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward_features(self, x: Tensor) -> Features:
        """Args: ``x`` ``[B, 3, 32, 32]``. Returns stem + three stage maps (strides 1, 2, 4, 8)."""
        stages = (self.layer1, self.layer2, self.layer3)
        out, feats, preacts = run_stem_and_stages(self.bn1(self.conv1(x)), stages)
        head = F.relu(self.bn2(self.conv2(out)))
        pooled = torch.flatten(F.adaptive_avg_pool2d(head, 1), 1)
        return Features(logits=self.linear(pooled), feats=feats, preact_feats=preacts, pooled=pooled)


@MODELS.register("ShuffleV2", family="cifar", input_size=32, kind="shufflenet")
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    """RepDistiller ``ShuffleV2``: net size 1 (stage widths 116/232/464, 1024-wide head)."""
    return ShuffleNetV2(1, num_classes)


__all__ = ["BasicBlock", "DownBlock", "ShuffleNetV2", "SplitBlock"]

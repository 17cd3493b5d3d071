"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) of RepDistiller ``models/wrn.py``.

Pre-activation blocks with mdistiller's/RepDistiller's attribute names (``conv1``, ``block1..3.layer.N``,
``bn1``, ``fc``; blocks ``bn1, conv1, bn2, conv2, convShortcut``). Stages end with a residual sum and no ReLU, so
``feats`` are the raw stage outputs (mdistiller's ``feats``) and ``preact_feats`` equal them; the final
``relu(bn1(.))`` is applied before pooling only. Dropout is omitted: every reference factory uses ``dropRate=0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdforge.models.base import KDModel, init_conv_bn
from kdforge.models.features import FeatureInfo, Features
from kdforge.registry import MODELS


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv ×2 with an identity or 1×1-conv shortcut taken after the first activation.

    Args:
        in_planes: input channels.
        out_planes: output channels.
        stride: stride of the first convolution.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, in_planes, H, W]``. Returns ``[B, out_planes, H/stride, W/stride]``."""
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # The projection shortcut sees the activated input, the identity shortcut the raw one (reference order).
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return torch.add(shortcut, out)


class NetworkBlock(nn.Module):
    """A stage of ``nb_layers`` wide blocks, kept under ``.layer`` for the reference key names."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(KDModel):
    """WRN-depth-k for 32×32 inputs.

    Args:
        depth: ``6n + 4`` (16, 40, ...).
        widen_factor: channel multiplier ``k``.
        num_classes: classifier width.
    """

    def __init__(self, depth: int, widen_factor: int = 1, num_classes: int = 100) -> None:
        super().__init__(num_classes)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        self.num_features = ch[3]
        self.feature_info = [
            FeatureInfo("stem", ch[0], 1),
            FeatureInfo("block1", ch[1], 1),
            FeatureInfo("block2", ch[2], 2),
            FeatureInfo("block3", ch[3], 4),
        ]
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Features:
        """Args: ``x`` ``[B, 3, 32, 32]``. Returns stem and three stage maps (strides 1, 1, 2, 4)."""
        out = self.conv1(x)
        feats = [out]
        for stage in (self.block1, self.block2, self.block3):
            out = stage(out)
            feats.append(out)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1), 1)
        return Features(logits=self.fc(pooled), feats=feats, preact_feats=list(feats), pooled=pooled)


def _register(depth: int, widen: int) -> None:
    name = f"wrn_{depth}_{widen}"

    def factory(num_classes: int = 100) -> WideResNet:
        return WideResNet(depth, widen, num_classes)

    factory.__name__ = name
    factory.__doc__ = f"RepDistiller ``{name}``: WRN-{depth}-{widen}."
    MODELS.register(name, family="cifar", input_size=32, kind="wrn")(factory)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)

__all__ = ["NetworkBlock", "WideBasicBlock", "WideResNet"]

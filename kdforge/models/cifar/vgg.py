"""VGG-BN networks (vgg8, vgg11, vgg13, vgg16, vgg19) of RepDistiller ``models/vgg.py`` (``vgg8_bn`` etc.).

Five conv blocks ``block0..4`` (conv-BN-ReLU, the last ReLU of each block applied outside it) separated by 2×2
max-pools ``pool0..2``; ``pool3`` is applied only to 64×64 inputs (Tiny-ImageNet), exactly as in the reference, so
at 32×32 ``block3`` and ``block4`` share stride 8. The head is a single ``classifier`` Linear(512, K) after global
average pooling. Attribute names match RepDistiller's/mdistiller's ``mdistiller/models/cifar/vgg.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import KDModel
from kdforge.models.features import FeatureInfo, Features
from kdforge.registry import MODELS

CFGS: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """conv3×3-BN-ReLU per width, without the final ReLU (the caller applies it to expose the pre-activation)."""
    layers: list[nn.Module] = []
    for v in widths:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(KDModel):
    """VGG with batch norm for 32×32 (or 64×64) inputs.

    Args:
        cfg: five lists of conv widths, one per block.
        num_classes: classifier width.
    """

    classifier_name = "classifier"

    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__(num_classes)
        self.block0 = make_block(cfg[0], 3)
        self.block1 = make_block(cfg[1], cfg[0][-1])
        self.block2 = make_block(cfg[2], cfg[1][-1])
        self.block3 = make_block(cfg[3], cfg[2][-1])
        self.block4 = make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        self.num_features = cfg[4][-1]
        self.feature_info = [
            FeatureInfo("block0", cfg[0][-1], 1),
            FeatureInfo("block1", cfg[1][-1], 2),
            FeatureInfo("block2", cfg[2][-1], 4),
            FeatureInfo("block3", cfg[3][-1], 8),
            FeatureInfo("block4", cfg[4][-1], 8),
        ]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Features:
        """Args: ``x`` ``[B, 3, 32, 32]``. Returns five block maps (strides 1, 2, 4, 8, 8 at 32×32)."""
        h = x.shape[2]
        pools: list[nn.Module | None] = [self.pool0, self.pool1, self.pool2, self.pool3 if h == 64 else None, None]
        blocks = (self.block0, self.block1, self.block2, self.block3, self.block4)
        feats, preacts = [], []
        out = x
        for block, pool in zip(blocks, pools, strict=True):
            pre = block(out)
            out = F.relu(pre)
            feats.append(out)
            preacts.append(pre)
            if pool is not None:
                out = pool(out)
        pooled = torch.flatten(self.pool4(out), 1)
        return Features(logits=self.classifier(pooled), feats=feats, preact_feats=preacts, pooled=pooled)


def _register(name: str, cfg: str) -> None:
    def factory(num_classes: int = 100) -> VGG:
        return VGG(CFGS[cfg], num_classes)

    factory.__name__ = name
    factory.__doc__ = f"RepDistiller ``{name}_bn``: VGG config {cfg!r} with batch norm."
    MODELS.register(name, family="cifar", input_size=32, kind="vgg")(factory)


for _name, _cfg in (("vgg8", "S"), ("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E")):
    _register(_name, _cfg)

__all__ = ["CFGS", "VGG", "make_block"]

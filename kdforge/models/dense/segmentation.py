"""Semantic-segmentation networks on the zoo's CIFAR ResNets: a dilated PSPNet teacher and an FCN student.

The backbone is :class:`kdforge.models.cifar.resnet.CifarResNet` with its layer names kept (``conv1, bn1,
layer1..3``), so a CIFAR classification checkpoint's backbone weights load into it (its ``fc`` is dropped). Two
changes adapt it to 64×64 canvases:

- the 3×3 stem convolution has stride 2, so the stages see the 32×32 resolution they were designed for;
- in the teacher, ``layer3`` replaces its stride by dilation 2 (torchvision's ``replace_stride_with_dilation``: the
  stage's first 3×3 convolution keeps the previous dilation, the others use the new one), giving output stride 4
  (16×16 maps at 64×64) instead of the student's 8.

Heads follow mmseg's ``PSPHead`` (pyramid pooling over bins 1, 2, 3, 6, 3×3 bottleneck, dropout 0.1, 1×1
classifier) and ``FCNHead`` (one 3×3 conv, dropout 0.1, 1×1 classifier); the teacher also has mmseg's auxiliary FCN
head on ``layer2``. ``forward`` returns logits at the input size; ``forward_features`` returns every map a
distillation method reads. These models are not in the global registry: :data:`SEGMENTATION_MODELS` names them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import init_conv_bn, run_stem_and_stages
from kdforge.models.cifar.resnet import CifarResNet
from kdforge.models.features import FeatureInfo


@dataclass
class SegFeatures:
    """Everything a distillation method may read from one forward pass of a segmentation network.

    Attributes:
        logits: ``[B, K, H, W]`` at the input size (``forward``'s output).
        seg_logits: ``[B, K, H/s, W/s]``, the classifier's output before upsampling (what mmrazor's CWD reads).
        feats: ``[stem, layer1, layer2, layer3, head]`` maps, each ``[B, C_l, H_l, W_l]``; ``head`` is the decode
            head's pre-logit map. Matches the model's ``feature_info`` one to one.
        preact_feats: the same maps before their final ReLU (the head map has none: it repeats ``feats[-1]``).
        aux_logits: ``[B, K, H, W]`` of the auxiliary head at the input size, ``None`` without one.
    """

    logits: Tensor
    seg_logits: Tensor
    feats: list[Tensor]
    preact_feats: list[Tensor]
    aux_logits: Tensor | None = None


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _dilate_stage(stage: nn.Sequential, dilation: int, previous_dilation: int = 1) -> None:
    """Turns a strided stage of BasicBlocks into a dilated one with the same weights.

    The stride of the first block (its first conv and its shortcut) becomes 1; that first conv keeps
    ``previous_dilation`` and every later 3×3 conv takes ``dilation`` with matching padding, so the receptive field
    grows as with the stride while the resolution stays.
    """
    for i, block in enumerate(stage):
        block.stride = 1
        block.conv1.stride = (1, 1)
        d1 = previous_dilation if i == 0 else dilation
        block.conv1.dilation, block.conv1.padding = (d1, d1), (d1, d1)
        block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class SegBackbone(nn.Module):
    """A CIFAR ResNet without its classifier, with a stride-2 stem and optionally a dilated ``layer3``.

    Args:
        depth: ``6n + 2``.
        num_filters: ``[stem, stage1, stage2, stage3]`` channels.
        dilate_last: replace ``layer3``'s stride by dilation 2 (output stride 4 instead of 8).
    """

    def __init__(self, depth: int, num_filters: Sequence[int], dilate_last: bool) -> None:
        super().__init__()
        net = CifarResNet(depth, list(num_filters), num_classes=1)
        net.conv1.stride = (2, 2)
        if dilate_last:
            _dilate_stage(net.layer3, 2)
        # Same attribute names as CifarResNet so its checkpoints load (minus fc).
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        s3 = 4 if dilate_last else 8
        self.feature_info = [
            FeatureInfo("stem", num_filters[0], 2),
            FeatureInfo("layer1", num_filters[1], 2),
            FeatureInfo("layer2", num_filters[2], 4),
            FeatureInfo("layer3", num_filters[3], s3),
        ]
        self.out_channels = num_filters[3]
        self.output_stride = s3

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Args: ``x`` ``[B, 3, H, W]``. Returns ``(feats, preacts)``: stem and stage maps, strides 2, 2, 4, 4|8."""
        _, feats, preacts = run_stem_and_stages(self.bn1(self.conv1(x)), (self.layer1, self.layer2, self.layer3))
        return feats, preacts


class PPM(nn.Module):
    """Pyramid pooling module (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017; mmseg ``PPM``).

    Args:
        in_channels: input channels.
        channels: channels of every pooled branch.
        bins: output sizes of the adaptive average pools.
    """

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int]) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(in_channels, channels, 1)) for b in self.bins
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Args: ``x`` ``[B, C, H, W]``. Returns one ``[B, channels, H, W]`` map per bin (upsampled bilinearly)."""
        return [F.interpolate(br(x), size=x.shape[-2:], mode="bilinear", align_corners=False) for br in self.branches]


class PSPHead(nn.Module):
    """PSPNet decode head: ``cat(x, PPM(x))`` → 3×3 conv-BN-ReLU → dropout → 1×1 classifier (mmseg ``PSPHead``).

    Args:
        in_channels: backbone channels.
        channels: PPM branch and bottleneck channels.
        num_classes: K.
        bins: pyramid bins.
        dropout: dropout before the classifier (mmseg: 0.1).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = PPM(in_channels, channels, bins)
        self.bottleneck = _conv_bn_relu(in_channels + len(self.ppm.bins) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.channels = channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args: ``x`` ``[B, C, H, W]``. Returns ``(pre_logit [B, channels, H, W], logits [B, K, H, W])``."""
        feat = self.bottleneck(torch.cat([x, *self.ppm(x)], dim=1))
        return feat, self.conv_seg(self.dropout(feat))


class FCNHead(nn.Module):
    """FCN decode head: ``num_convs`` 3×3 conv-BN-ReLU → dropout → 1×1 classifier (mmseg ``FCNHead``,
    ``concat_input=False``).

    Args:
        in_channels: backbone channels.
        channels: hidden channels.
        num_classes: K.
        num_convs: 3×3 convolutions before the classifier.
        dropout: dropout before the classifier (mmseg: 0.1).
    """

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(_conv_bn_relu(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.channels = channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Args: ``x`` ``[B, C, H, W]``. Returns ``(pre_logit [B, channels, H, W], logits [B, K, H, W])``."""
        feat = self.convs(x)
        return feat, self.conv_seg(self.dropout(feat))


class SegmentationNet(nn.Module):
    """Backbone + decode head (+ optional auxiliary FCN head on ``layer2``); logits upsampled to the input size.

    Args:
        backbone: a :class:`SegBackbone`.
        head: a :class:`PSPHead` or :class:`FCNHead` on ``layer3``.
        num_classes: K.
        aux_head: optional :class:`FCNHead` on ``layer2`` (training-time only; not in ``forward``).
    """

    def __init__(self, backbone: SegBackbone, head: nn.Module, num_classes: int, aux_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = head
        self.aux_head = aux_head
        self.num_classes = num_classes
        self.output_stride = backbone.output_stride
        self.feature_info = [*backbone.feature_info, FeatureInfo("head", head.channels, backbone.output_stride)]
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns logits ``[B, K, H, W]`` (static graph: traceable, ONNX-exportable)."""
        feats, _ = self.backbone(x)
        _, logits = self.decode_head(feats[-1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_features(self, x: Tensor) -> SegFeatures:
        """Args: ``x`` ``[B, 3, H, W]``. Returns :class:`SegFeatures` (``logits`` equal ``forward(x)``)."""
        feats, preacts = self.backbone(x)
        head_feat, seg_logits = self.decode_head(feats[-1])
        logits = F.interpolate(seg_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        aux = None
        if self.aux_head is not None:
            _, aux_low = self.aux_head(feats[2])
            aux = F.interpolate(aux_low, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return SegFeatures(
            logits=logits,
            seg_logits=seg_logits,
            feats=[*feats, head_feat],
            preact_feats=[*preacts, head_feat],
            aux_logits=aux,
        )


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def pspnet_resnet(
    depth: int, filters: Sequence[int], num_classes: int, channels: int, aux: bool = True, dropout: float = 0.1
) -> SegmentationNet:
    """Dilated CIFAR ResNet (output stride 4) + PSP head (+ auxiliary FCN head on ``layer2``)."""
    backbone = SegBackbone(depth, filters, dilate_last=True)
    head = PSPHead(backbone.out_channels, channels, num_classes, dropout=dropout)
    aux_head = FCNHead(filters[2], channels // 2, num_classes, dropout=dropout) if aux else None
    return SegmentationNet(backbone, head, num_classes, aux_head)


def fcn_resnet(
    depth: int, filters: Sequence[int], num_classes: int, channels: int, dilate_last: bool = False, dropout: float = 0.1
) -> SegmentationNet:
    """CIFAR ResNet (output stride 8, or 4 with ``dilate_last``) + one-conv FCN head."""
    backbone = SegBackbone(depth, filters, dilate_last=dilate_last)
    head = FCNHead(backbone.out_channels, channels, num_classes, dropout=dropout)
    return SegmentationNet(backbone, head, num_classes)


def pspnet_resnet20(num_classes: int = 11, aux: bool = True) -> SegmentationNet:
    """Teacher: dilated ``resnet20`` (16/16/32/64 channels), PSP head with 64 channels, aux head on ``layer2``."""
    return pspnet_resnet(20, _SMALL, num_classes, channels=64, aux=aux)


def pspnet_resnet32x4(num_classes: int = 11, aux: bool = True) -> SegmentationNet:
    """Large teacher: dilated ``resnet32x4`` (32/64/128/256 channels), PSP head with 128 channels, aux head."""
    return pspnet_resnet(32, _X4, num_classes, channels=128, aux=aux)


def fcn_resnet8(num_classes: int = 11) -> SegmentationNet:
    """Student: ``resnet8`` (16/16/32/64 channels, output stride 8), FCN head with 32 channels."""
    return fcn_resnet(8, _SMALL, num_classes, channels=32)


def fcn_resnet14(num_classes: int = 11) -> SegmentationNet:
    """Student: ``resnet14`` (output stride 8), FCN head with 64 channels."""
    return fcn_resnet(14, _SMALL, num_classes, channels=64)


#: The segmentation networks by name (used by ``SegmentationTask.build_model``; not in the global registry).
SEGMENTATION_MODELS: dict[str, Callable[..., SegmentationNet]] = {
    "pspnet_resnet20": pspnet_resnet20,
    "pspnet_resnet32x4": pspnet_resnet32x4,
    "fcn_resnet8": fcn_resnet8,
    "fcn_resnet14": fcn_resnet14,
}

__all__ = [
    "PPM",
    "SEGMENTATION_MODELS",
    "FCNHead",
    "PSPHead",
    "SegBackbone",
    "SegFeatures",
    "SegmentationNet",
    "fcn_resnet",
    "fcn_resnet8",
    "fcn_resnet14",
    "pspnet_resnet",
    "pspnet_resnet20",
    "pspnet_resnet32x4",
]

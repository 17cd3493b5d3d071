"""Trainable modules that methods attach to a student or teacher, planned from static ``feature_info``.

They live inside the method's trainable module (and its checkpoint state), never in ``student.pt``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ShadowHead(nn.Module):
    """SHAKE's shadow head: fuses the teacher's last three stages and reuses the frozen teacher classifier.

    Li & Jin, "Shadow Knowledge Distillation: Bridging Offline and Online Knowledge Transfer", NeurIPS 2022
    (lilujunai/SHAKE ``ShakeHead``): ``x = fuse5(fuse3(fuse1(F1) + fuse2(F2)) + fuse4(F3))``, average-pooled, then
    ``linear(x, W_t, b_t)`` with the teacher's classifier held fixed, so the head is a cheap, trainable proxy of
    the teacher that can adapt to the student while staying in the teacher's output space.

    Generalised from the CIFAR ResNets of the reference: the down-sampling strides come from the stages'
    ``feature_info`` strides (1 where two stages share a resolution) and the last fusion maps to the classifier's
    input width, which differs from the last stage's channels in MobileNetV2/VGG-style teachers.

    Args:
        channels: channels of the three stages ``(C1, C2, C3)``.
        strides: their strides relative to the input ``(s1, s2, s3)``.
        out_features: the teacher classifier's input width.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], out_features: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        s1, s2, s3 = strides
        self.fuse1 = conv_bn_relu(c1, c2, 3, max(s2 // s1, 1))
        self.fuse2 = conv_bn_relu(c2, c2, 1)
        self.fuse3 = conv_bn_relu(c2, c3, 3, max(s3 // s2, 1))
        self.fuse4 = conv_bn_relu(c3, c3, 1)
        self.fuse5 = conv_bn_relu(c3, out_features, 3)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: Sequence[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor:
        """``feats``: the three stage maps ``[B, C_i, H_i, W_i]``; ``weight [K, D]``/``bias [K]`` the teacher
        classifier (used as constants). Returns logits ``[B, K]``."""
        f1, f2, f3 = feats
        x = self.fuse1(f1) + self.fuse2(f2)
        x = self.fuse3(x)
        if x.shape[-2:] != f3.shape[-2:]:  # odd input sizes round differently in the teacher's own stages
            x = F.adaptive_avg_pool2d(x, f3.shape[-2:])
        x = self.fuse5(x + self.fuse4(f3))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(x, weight.detach(), None if bias is None else bias.detach())


class ConvReg(nn.Module):
    """FitNets regressor ``r``: student map → teacher hint shape, then BN and (by default) ReLU.

    RepDistiller ``models/util.py:ConvReg`` (also mdistiller ``distillers/FitNet.py``), planned from strides instead
    of a dummy forward: the same resolution → 1×1 conv; a student map twice as large → 3×3 conv, stride 2; half as
    large → 4×4 transposed conv, stride 2. The convolutions keep their bias, as in the reference.

    Args:
        in_channels: student channels at the guided layer.
        out_channels: teacher channels at the hint layer.
        in_stride: stride of the student map relative to the input.
        out_stride: stride of the teacher map.
        use_relu: apply the final ReLU (the reference default).
    """

    def __init__(self, in_channels: int, out_channels: int, in_stride: int, out_stride: int, use_relu: bool = True):
        super().__init__()
        if in_stride == out_stride:
            self.conv: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        elif 2 * in_stride == out_stride:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        elif in_stride == 2 * out_stride:
            self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
        else:
            raise ValueError(
                f"FitNets regressor: student stride {in_stride} and teacher stride {out_stride} differ by more than "
                "a factor 2; pick a hint layer of closer resolution (method.hint_layer)"
            )
        self.bn = nn.BatchNorm2d(out_channels)
        self.use_relu = use_relu

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """``x [B, C_s, H_s, W_s]`` → ``[B, C_t, H_t, W_t]``; ``size`` = the teacher map's ``(H_t, W_t)``."""
        x = self.conv(x)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            # Odd input sizes round differently in the two networks (7 vs. 2·4); the reference needs equal shapes.
            x = F.adaptive_avg_pool2d(x, size)
        x = self.bn(x)
        return F.relu(x) if self.use_relu else x


__all__ = ["ConvReg", "ShadowHead", "conv_bn_relu"]

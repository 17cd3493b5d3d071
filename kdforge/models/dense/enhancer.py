"""A small U-Net low-light enhancer in teacher and student widths.

Three down-sampling levels (full, 1/2, 1/4 resolution and a 1/8 bottleneck), each level two 3×3 convolutions with
LeakyReLU(0.2); stride-2 3×3 convolutions down, 2×2 stride-2 transposed convolutions up, skip connections by
concatenation (Ronneberger et al., "U-Net", MICCAI 2015; the layout of the low-light U-Nets of Chen et al., "Learning
to See in the Dark", CVPR 2018, without BatchNorm, whose batch statistics are unreliable at the small batch sizes of
restoration training). Widths ``w, 2w, 4w, 8w``: the teacher has ``w = 32``, the students ``w = 12`` or ``8``.

The output is residual, ``x + head(·)``, and *not* clamped inside the network: a clamp (or a saturating sigmoid)
would cut the gradient of every pixel outside [0, 1] during training; ``EnhancementTask.predict`` clamps. Inputs of
any ``H × W`` are replicate-padded on the bottom/right to a multiple of ``2³`` and the output is cropped back, so
``forward`` returns ``[B, 3, H, W]``; the stage maps of :meth:`UNetEnhancer.forward_features` are those of the
padded image (teacher and student pad alike, so their stages align).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class EnhancerFeatures:
    """Stage maps and output of one forward pass.

    Attributes:
        feats: ``[enc0, enc1, enc2, bottleneck, dec2, dec1, dec0]``, channels ``w, 2w, 4w, 8w, 4w, 2w, w`` at
            strides ``1, 2, 4, 8, 4, 2, 1`` of the padded input.
        out: ``[B, 3, H, W]`` the enhanced image (unclamped), as ``forward``.
    """

    feats: list[Tensor]
    out: Tensor


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
    )


class UNetEnhancer(nn.Module):
    """U-Net enhancer ``[B, 3, H, W]`` (low-light, in [0, 1]) → ``[B, 3, H, W]`` (enhanced, unclamped).

    Args:
        width: channels of the first level ``w`` (levels have ``w, 2w, 4w`` and the bottleneck ``8w``).
        in_channels: input and output channels.
    """

    levels = 3

    def __init__(self, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        w = width
        chans = [w, 2 * w, 4 * w]
        self.width = w
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.enc.append(_block(cin, c))
            self.down.append(nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.2, True)))
            cin = 2 * c
        self.bottleneck = _block(8 * w, 8 * w)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c in reversed(chans):
            self.up.append(nn.ConvTranspose2d(2 * c, c, 2, stride=2))
            self.dec.append(_block(2 * c, c))
        self.head = nn.Conv2d(w, in_channels, 3, padding=1)
        # A near-zero head starts the residual enhancer near the identity (the input is the best untrained guess);
        # not exactly zero, so the gradient reaches every layer from the first step.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    @property
    def stage_channels(self) -> list[int]:
        """Channels of each map of :attr:`EnhancerFeatures.feats` (for FitNets adapters)."""
        w = self.width
        return [w, 2 * w, 4 * w, 8 * w, 4 * w, 2 * w, w]

    @property
    def stage_strides(self) -> list[int]:
        """Stride of each map of :attr:`EnhancerFeatures.feats` relative to the padded input."""
        return [1, 2, 4, 8, 4, 2, 1]

    def forward_features(self, x: Tensor) -> EnhancerFeatures:
        """All encoder/decoder stage maps and the output. ``x`` ``[B, 3, H, W]``."""
        h, w = x.shape[-2], x.shape[-1]
        m = 2**self.levels
        ph, pw = (-h) % m, (-w) % m
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        feats: list[Tensor] = []
        skips: list[Tensor] = []
        y = xp
        for enc, down in zip(self.enc, self.down, strict=True):
            y = enc(y)
            feats.append(y)
            skips.append(y)
            y = down(y)
        y = self.bottleneck(y)
        feats.append(y)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            y = dec(torch.cat([up(y), skip], dim=1))
            feats.append(y)
        out = (xp + self.head(y))[..., :h, :w]
        return EnhancerFeatures(feats=feats, out=out)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → enhanced ``[B, 3, H, W]`` (unclamped)."""
        return self.forward_features(x).out


def unet_enhancer_w32() -> UNetEnhancer:
    """Teacher: width 32 (2.70 M parameters)."""
    return UNetEnhancer(width=32)


def unet_enhancer_w12() -> UNetEnhancer:
    """Student: width 12 (0.38 M parameters)."""
    return UNetEnhancer(width=12)


def unet_enhancer_w8() -> UNetEnhancer:
    """Student: width 8 (0.17 M parameters)."""
    return UNetEnhancer(width=8)


#: Builders by name, used by ``EnhancementTask.build_model`` (not in the global model registry on purpose).
ENHANCEMENT_MODELS: dict[str, Callable[[], UNetEnhancer]] = {
    "unet_enhancer_w32": unet_enhancer_w32,
    "unet_enhancer_w12": unet_enhancer_w12,
    "unet_enhancer_w8": unet_enhancer_w8,
}


def select_stages(n: int, stages: list[int] | None) -> list[int]:
    """Indices into ``EnhancerFeatures.feats`` (``None``: all ``n``), each checked and made non-negative."""
    if stages is None:
        return list(range(n))
    if not stages:
        raise ValueError("stages must name at least one stage, or be null for all of them")
    for i in stages:
        if not -n <= i < n:
            raise ValueError(f"stage {i} is out of range: the enhancer has {n} stage maps (0..{n - 1})")
    return [i % n for i in stages]

"""Batched tensor augmentation on the training device: random crop with padding, horizontal flip, normalize.

airbench-style: the whole batch is transformed with a handful of tensor ops instead of per-sample PIL calls in
worker processes, so CIFAR-sized training never leaves the GPU. Randomness comes from an explicit
``torch.Generator`` so a batch's augmentation is reproducible (and replayable on resume).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Channel statistics of the training sets, as used by RepDistiller/mdistiller (CIFAR) and torchvision (ImageNet).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_crop(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop of the original size from the zero-padded image.

    Args:
        x: ``[B, C, H, W]`` (any dtype).
        padding: zero padding on each side; the crop offset of each sample is uniform in ``[0, 2·padding]``.
        generator: randomness source on ``x``'s device.

    Returns:
        ``[B, C, H, W]``, same dtype.
    """
    if padding == 0:
        return x
    b = x.shape[0]
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    return crop_at(x, dy, dx, padding)


def crop_at(x: Tensor, dy: Tensor, dx: Tensor, padding: int = 4) -> Tensor:
    """Per-sample crop of the original size from the zero-padded image, at given offsets.

    Args:
        x: ``[B, C, H, W]`` (any dtype).
        dy, dx: ``[B]`` int64 top/left offsets into the padded image, each in ``[0, 2·padding]``.
        padding: zero padding on each side.

    Returns:
        ``[B, C, H, W]``, same dtype.
    """
    if padding == 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    # One gather for the whole batch: advanced indexing on (batch, row, col) picks each sample's own window.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Flip each sample left-right with probability ``p``. ``x`` ``[B, C, H, W]`` → same shape."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return hflip_where(x, flip)


def hflip_where(x: Tensor, flip: Tensor) -> Tensor:
    """Flip left-right the samples where ``flip`` ``[B]`` (bool) is set. ``x`` ``[B, C, H, W]`` → same shape."""
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``[B, C, H, W]`` in 0..255 → ``(x/255 − mean)/std`` as ``dtype``."""
    m = torch.tensor(mean, device=x.device, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=dtype).view(1, -1, 1, 1)
    return (x.to(dtype) / 255.0 - m) / s


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "crop_at",
    "hflip_where",
    "normalize",
    "random_crop",
    "random_hflip",
]

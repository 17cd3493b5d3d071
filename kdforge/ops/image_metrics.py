"""PSNR and SSIM of image batches, and the enhancement evaluator.

Definitions (docs/tasks/enhancement.md states them with the usual pitfalls):

- **PSNR** ``10·log10(L² / MSE)`` per image, the MSE over every pixel *and* channel (RGB, no conversion to Y/grey),
  as scikit-image's ``peak_signal_noise_ratio(gt, pred, data_range=L)``. Identical images give ``+inf``.
- **SSIM** per channel with an 11-tap Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, population covariance, the
  mean over the *valid* region (windows fully inside the image) and then over the three channels, as scikit-image's
  ``structural_similarity(gt, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  channel_axis=-1, data_range=L)``. Not MATLAB's ``ssim.m`` (which converts to grey and downsamples).
- ``L`` (``data_range``) is 1.0 for float images in [0, 1] and 255 for uint8 images; no brightness correction by the
  ground truth's mean (some low-light papers rescale the prediction to the GT mean first — we do not).

Both are checked against scikit-image in tests/test_image_metrics.py.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WIN_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

Padding = Literal["valid", "reflect"]


def work_dtype(t: Tensor) -> torch.dtype:
    # float32 at least (bf16/fp16/uint8 inputs are promoted); float64 inputs keep double precision.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gaussian_window(
    win_size: int = SSIM_WIN_SIZE,
    sigma: float = SSIM_SIGMA,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Normalized 1-D Gaussian taps ``exp(−x²/2σ²) / Σ``, ``x = −r..r``, ``r = (win_size − 1) / 2``.

    scipy's ``gaussian_filter`` with ``truncate = 3.5`` (what scikit-image passes for SSIM) uses radius
    ``int(3.5·1.5 + 0.5) = 5``, i.e. exactly these 11 taps; the 2-D window is their outer product.

    Returns:
        ``[win_size]``.
    """
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    x = torch.arange(win_size, dtype=torch.float64, device=device) - (win_size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(dtype)


def ssim_map(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    *,
    padding: Padding = "valid",
    win_size: int = SSIM_WIN_SIZE,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> Tensor:
    """Per-pixel, per-channel SSIM ``(2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))``.

    Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error visibility to structural similarity",
    IEEE TIP 2004, with scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` conventions (``skimage/metrics/_structural_similarity.py``): local moments by a
    separable Gaussian filter, population covariance ``σxy = E[xy] − μxμy``, ``C1 = (K1·L)²``, ``C2 = (K2·L)²``.

    Args:
        x, y: ``[B, C, H, W]`` (same shape), values on a scale of ``data_range``.
        data_range: ``L``, the dynamic range (1.0 for images in [0, 1], 255 for uint8 values).
        padding: ``"valid"``: only windows fully inside the image, output ``[B, C, H − win + 1, W − win + 1]``
            (scikit-image filters with ``mode='reflect'`` and then crops ``(win − 1) // 2`` pixels per side, which
            leaves exactly these windows, so its border mode never reaches the mean). ``"reflect"``: the image is
            mirror-padded (``torch`` reflect, edge not repeated) and the output is ``[B, C, H, W]``.
        win_size, sigma, k1, k2: the window and the stabilizing constants.

    Returns:
        The SSIM map, float32 (float64 for float64 inputs). Differentiable in ``x`` and ``y``.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"ssim_map needs two [B, C, H, W] tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    dtype = work_dtype(x)
    x, y = x.to(dtype), y.to(dtype)
    _, c, h, w = x.shape
    r = (win_size - 1) // 2
    if padding == "reflect":
        if min(h, w) <= r:
            raise ValueError(f"reflect-padded SSIM needs images larger than {r} px per side, got {h}×{w}")
    elif padding == "valid":
        if min(h, w) < win_size:
            raise ValueError(f"valid SSIM needs images of at least {win_size}×{win_size} px, got {h}×{w}")
    else:
        raise ValueError(f"padding must be 'valid' or 'reflect', got {padding!r}")
    g = gaussian_window(win_size, sigma, dtype=dtype, device=x.device)
    # One grouped, separable convolution filters all five moment images of every channel at once.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [B, 5C, H, W]
    if padding == "reflect":
        stack = F.pad(stack, (r, r, r, r), mode="reflect")
    n = stack.shape[1]
    # Autocast would run these convolutions in half precision; E[x²] − μ² then cancels catastrophically.
    with torch.autocast(device_type=x.device.type, enabled=False):
        stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, win_size), groups=n)
        stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(n, 1, win_size, 1), groups=n)
    mx, my, exx, eyy, exy = stack.split(c, dim=1)
    vx = exx - mx * mx
    vy = eyy - my * my
    vxy = exy - mx * my
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def default_data_range(x: Tensor) -> float:
    """255 for uint8 images, 1.0 for floating images in [0, 1]."""
    return 255.0 if x.dtype == torch.uint8 else 1.0


def _prepare(pred: Tensor, target: Tensor, data_range: float | None) -> tuple[Tensor, Tensor, float]:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() == 3:
        pred, target = pred[None], target[None]
    if pred.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W] or [C, H, W], got {tuple(pred.shape)}")
    rng = default_data_range(target) if data_range is None else float(data_range)
    if pred.dtype == torch.float64 or target.dtype == torch.float64:
        dtype = torch.float64
    elif pred.dtype == torch.uint8 and target.dtype == torch.uint8 and pred.device.type != "mps":
        dtype = torch.float64  # integer images are exact in double; scikit-image also works in float64 for them
    else:
        dtype = torch.float32
    return pred.to(dtype), target.to(dtype), rng


def psnr(pred: Tensor, target: Tensor, data_range: float | None = None) -> Tensor:
    """Peak signal-to-noise ratio of each image, ``10·log10(L² / mean((P − T)²))``.

    Args:
        pred: ``[B, C, H, W]`` or ``[C, H, W]``.
        target: same shape.
        data_range: ``L``; ``None`` takes 255 for uint8 and 1.0 otherwise.

    Returns:
        ``[B]`` in dB, float32 (float64 for float64 or uint8 inputs). ``+inf`` where ``P = T``.
    """
    p, t, rng = _prepare(pred, target, data_range)
    mse = (p - t).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(rng * rng / mse)


def ssim(pred: Tensor, target: Tensor, data_range: float | None = None) -> Tensor:
    """Mean structural similarity of each image over the valid region and the channels (see the module doc).

    Args:
        pred: ``[B, C, H, W]`` or ``[C, H, W]``, at least 11×11.
        target: same shape.
        data_range: ``L``; ``None`` takes 255 for uint8 and 1.0 otherwise.

    Returns:
        ``[B]``, float32 (float64 for float64 or uint8 inputs).
    """
    p, t, rng = _prepare(pred, target, data_range)
    # Channels have equal valid areas, so the mean over (C, H', W') is the mean of per-channel means.
    return ssim_map(p, t, rng, padding="valid").mean(dim=(1, 2, 3))

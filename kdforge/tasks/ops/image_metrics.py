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

from typing import Any, ClassVar

import torch
from torch import Tensor

from kdforge.losses.image import ssim_map
from kdforge.tasks.base import Evaluator, Reducer


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


class EnhancementEvaluator(Evaluator):
    """Mean per-image PSNR and SSIM over a split (each image weighs the same whatever its size).

    State: the float64 sums of per-image PSNR and SSIM and the image count, all-reduced by ``compute``; a split cut
    over several processes therefore gives the one-process numbers up to float64 summation order.

    Args:
        data_range: ``L`` of the predictions and targets (1.0 for [0, 1] images).
    """

    primary: ClassVar[str] = "psnr"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, data_range: float = 1.0) -> None:
        self.data_range = float(data_range)
        self.reset()

    def reset(self) -> None:
        self._sums: Tensor | None = None  # [psnr_sum, ssim_sum, count] float64 on the data's device

    def update(self, preds: Any, targets: Any) -> None:
        """Add a batch of predictions ``[B, 3, H, W]`` (clamped to [0, 1] by the task) and clean images."""
        pred, target = preds, targets
        dtype = torch.float32 if pred.device.type == "mps" else torch.float64  # MPS has no float64
        p = psnr(pred.to(dtype), target.to(dtype), self.data_range)
        s = ssim(pred.to(dtype), target.to(dtype), self.data_range)
        count = torch.tensor(float(p.numel()), dtype=dtype, device=p.device)
        batch = torch.stack([p.sum(), s.sum(), count]).to(dtype)
        self._sums = batch if self._sums is None else self._sums + batch.to(self._sums.device)

    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64)
        if reducer is not None:
            sums = reducer.sum(sums)
        psnr_sum, ssim_sum, count = (float(v) for v in sums.tolist())
        if count == 0:
            return {"psnr": float("nan"), "ssim": float("nan"), "num_images": 0.0}
        return {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "num_images": count}

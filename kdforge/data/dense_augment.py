"""Joint geometric augmentation of images and dense targets, batched on the device.

One random scale, crop window and horizontal flip per sample is drawn as a :class:`ScaleCropFlip` and then applied
to every target of that sample with the same geometry: images are resampled bilinearly, label masks by nearest
neighbour (and padded with the ignore index), and points (box corners) map through :meth:`ScaleCropFlip.map_xy`.

Geometry in continuous pixel coordinates (pixel ``i`` covers ``[i, i+1)``, PyTorch's ``align_corners=False``): an
input point ``x`` goes to ``x' = s·x − o`` in the output window, then ``x' ← W_out − x'`` when flipped. The crop
offset ``o`` is uniform over the positions that keep the scaled image covering the window (or, where the scaled
image is smaller than the window, over the placements of the image inside it, the rest being padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ScaleCropFlip:
    """Per-sample geometry of a random scale, crop and flip.

    Attributes:
        scale: ``[B]`` float32 scale factors ``s``.
        offset: ``[B, 2]`` float32 crop offsets ``(o_x, o_y)`` in scaled-image pixels.
        flip: ``[B]`` bool, horizontal flip.
        in_size: ``(H_in, W_in)``.
        out_size: ``(H_out, W_out)``.
    """

    scale: Tensor
    offset: Tensor
    flip: Tensor
    in_size: tuple[int, int]
    out_size: tuple[int, int]

    def theta(self) -> Tensor:
        """``[B, 2, 3]`` affine matrices for ``F.affine_grid`` (output normalized coords → input normalized coords).

        From ``x_in = (x_out + o) / s`` and ``x_norm = 2x / W − 1`` on each axis; a flip negates the slope in ``x``.
        """
        (hi, wi), (ho, wo) = self.in_size, self.out_size
        s = self.scale
        ax = wo / (s * wi)
        ay = ho / (s * hi)
        bx = ax + 2 * self.offset[:, 0] / (s * wi) - 1
        by = ay + 2 * self.offset[:, 1] / (s * hi) - 1
        ax = torch.where(self.flip, -ax, ax)
        zero = torch.zeros_like(s)
        return torch.stack([torch.stack([ax, zero, bx], 1), torch.stack([zero, ay, by], 1)], 1)

    def map_xy(self, xy: Tensor) -> Tensor:
        """Input-image points ``[B, M, 2]`` (x, y in pixels) → output-window points ``[B, M, 2]``.

        Box corners map through it too (a flipped box swaps its x corners: take min/max afterwards).
        """
        out = xy * self.scale[:, None, None] - self.offset[:, None, :]
        x = torch.where(self.flip[:, None], self.out_size[1] - out[..., 0], out[..., 0])
        return torch.stack([x, out[..., 1]], dim=-1)


def sample_scale_crop_flip(
    batch: int,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> ScaleCropFlip:
    """Draws one scale ``s ~ U(scale_range)``, crop offset and flip per sample.

    The draws use ``generator`` on its own device (CPU by default) so a seed gives the same geometry on any
    training device; the few numbers are then moved to ``device``.

    Args:
        batch: B.
        in_size: ``(H_in, W_in)`` of the inputs.
        out_size: ``(H_out, W_out)`` of the crops.
        scale_range: ``(low, high)`` of the uniform scale factor (mmseg's ``ratio_range``).
        flip_prob: probability of a horizontal flip.
        generator: the random source.
        device: where the parameters live.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, 4, generator=generator, device=gen_device).to(device)
    lo, hi = scale_range
    scale = lo + (hi - lo) * u[:, 0]
    sizes = torch.tensor([in_size[1], in_size[0]], dtype=torch.float32, device=device)
    outs = torch.tensor([out_size[1], out_size[0]], dtype=torch.float32, device=device)
    slack = scale[:, None] * sizes[None, :] - outs[None, :]  # > 0: crop inside the image; < 0: image inside the crop
    offset = torch.minimum(slack, torch.zeros_like(slack)) + slack.abs() * u[:, 1:3]
    return ScaleCropFlip(scale, offset, u[:, 3] < flip_prob, tuple(in_size), tuple(out_size))


def warp_images(images: Tensor, params: ScaleCropFlip, fill: float = 0.0) -> Tensor:
    """Bilinear resampling of ``[B, C, H_in, W_in]`` float images to ``[B, C, H_out, W_out]``, ``fill`` outside."""
    grid = F.affine_grid(params.theta().to(images.dtype), [images.shape[0], 1, *params.out_size], align_corners=False)
    # Sampling ``images − fill`` with zero padding and adding ``fill`` back pads with ``fill`` and leaves the inside
    # unchanged (bilinear weights sum to one there).
    shifted = images if fill == 0.0 else images - fill
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out if fill == 0.0 else out + fill


def warp_masks(masks: Tensor, params: ScaleCropFlip, ignore_index: int = 255) -> Tensor:
    """Nearest-neighbour resampling of ``[B, H_in, W_in]`` int64 label masks; ``ignore_index`` outside the image.

    The labels travel through ``grid_sample`` as ``label + 1`` in float32 (exact for labels below 2²⁴), so that the
    sampler's zero padding can be told apart from class 0.
    """
    grid = F.affine_grid(params.theta(), [masks.shape[0], 1, *params.out_size], align_corners=False)
    shifted = (masks.to(torch.float32) + 1).unsqueeze(1)
    out = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False).squeeze(1)
    out = out.round().long() - 1
    return torch.where(out < 0, torch.full_like(out, ignore_index), out)


def random_scale_crop_flip(
    images: Tensor,
    masks: Tensor,
    out_size: tuple[int, int] | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip_prob: float = 0.5,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Joint random scale, crop and horizontal flip of images and their label masks (segmentation).

    Args:
        images: ``[B, C, H, W]`` float.
        masks: ``[B, H, W]`` int64.
        out_size: crop size (default: the input size).
        scale_range: uniform scale range.
        flip_prob: probability of a horizontal flip.
        ignore_index: label of padded pixels.
        generator: the random source (seeded by the loader).

    Returns:
        ``(images [B, C, H_out, W_out], masks [B, H_out, W_out])``.
    """
    if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not match")
    in_size = (images.shape[-2], images.shape[-1])
    params = sample_scale_crop_flip(
        images.shape[0], in_size, out_size or in_size, scale_range, flip_prob, generator, images.device
    )
    return warp_images(images, params), warp_masks(masks, params, ignore_index)


__all__ = ["ScaleCropFlip", "random_scale_crop_flip", "sample_scale_crop_flip", "warp_images", "warp_masks"]

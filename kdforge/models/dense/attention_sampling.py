"""Trilinear attention and attention-based resampling (TASN), the front end of DATS.

Zheng et al., "Looking for the Devil in the Details: Learning Trilinear Attention Sampling Network for Fine-grained
Image Recognition", CVPR 2019. Checked against the authors' code, researchmm/tasn: ``tasn-pytorch/mymodel/tasn.py``
(``tri_att``, ``att_sample``) and the CUDA grid generator ``tasn-pytorch/src/att_grid_generator_cuda_kernel.cu``,
which kdforge re-expresses as batched tensor operations (no custom kernel, runs on any device).

The sampler turns an attention map into a non-uniform sampling grid: each output row (column) sits at an equal
step of the cumulative distribution of the map's row (column) maxima, so rows and columns with high attention are
sampled densely and the regions they cover are magnified. The grid depends only on the (detached) attention, so the
gradient of the resampled image flows to the image alone, as in TASN.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    # The softmax-of-products and the cumulative sums are precision-sensitive, so autocast is switched off; the meta
    # device (shape inference) has no autocast to switch.
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def trilinear_attention(feat: Tensor, scale: float = 2.0) -> Tensor:
    """TASN's trilinear attention ``softmax(softmax(s·X)·Xᵀ)·X``, one attention map per channel.

    ``X`` is the feature map reshaped to ``[C, H·W]``. The inner softmax normalises each channel over positions
    (``scale`` sharpens it: the reference multiplies by 2 "to obtain an appropriate scale for the input of softmax");
    the product with ``Xᵀ`` gives channel-to-channel relations, normalised by a softmax over the second channel axis;
    multiplying back by ``X`` folds those spatial relations into every channel's map.

    Args:
        feat: ``[B, C, H, W]`` features (non-negative in TASN: post-ReLU).
        scale: the factor inside the first softmax.

    Returns:
        ``[B, C, H, W]`` float32 attention maps, detached (TASN trains the attention network only through its own
        classification loss; the maps steer sampling and carry no gradient).
    """
    b, c, h, w = feat.shape
    with _fp32(feat.device):
        x = feat.detach().float().reshape(b, c, h * w)
        relations = torch.softmax(torch.softmax(x * scale, dim=2) @ x.transpose(1, 2), dim=2)  # [B, C, C]
        return (relations @ x).reshape(b, c, h, w)


def structure_and_detail_maps(
    attention: Tensor, generator: torch.Generator | None = None, detail_offset: float = 0.01
) -> tuple[Tensor, Tensor]:
    """TASN's two sampling maps: the structure map (sum over channels) and a detail map (one random channel).

    Args:
        attention: ``[B, C, H, W]`` trilinear attention maps.
        generator: source of the detail channel drawn per sample (seeded for reproducibility).
        detail_offset: added to the detail map (0.01 in the reference) so a channel that is zero everywhere still
            gives a valid, uniform sampling distribution.

    Returns:
        ``(structure, detail)``, each ``[B, 1, H, W]``.
    """
    b, c = attention.shape[:2]
    structure = attention.sum(dim=1, keepdim=True)
    channel = torch.randint(c, (b,), generator=generator, device="cpu").to(attention.device)
    detail = attention[torch.arange(b, device=attention.device), channel].unsqueeze(1) + detail_offset
    return structure, detail


def _axis_coordinates(profile: Tensor, out_size: int, dense: float, iters: int, endpoint: bool) -> Tensor:
    """Inverse-CDF sample positions along one axis, in grid units ``[-1, 1]``.

    Mirrors the reference grid generator: the profile (normalised to sum ``out_size``) is clipped at ``dense``
    times the uniform density and the clipped mass spread evenly, ``iters`` times, so no region is magnified much
    more than ``dense``× (the spread adds a little back on top of the clip); then output position ``i`` sits where
    the cumulative profile reaches ``i·step``.

    Args:
        profile: ``[B, 2, A]`` non-negative row and column profiles (both axes at once, the clipping threshold is
            shared between them as in the reference).
        out_size: number of output positions.
        dense: the largest magnification.
        iters: clip-and-redistribute rounds.
        endpoint: place the last output position at the end of the cumulative profile (step ``total/(out−1)``),
            so a uniform map gives the identity grid. ``False`` is the reference's step ``total/out``, whose last
            output stops about one input position short of the border (a uniform map then shrinks the image
            slightly toward its top-left corner).

    Returns:
        ``[B, 2, out_size]`` coordinates in ``[-1, 1]`` (``align_corners=True`` units: -1 and 1 are the centres of
        the first and last input positions).
    """
    a = profile.shape[-1]
    m = profile / profile.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(profile.dtype).tiny) * out_size
    threshold = torch.full_like(m[:, :1, :1], dense * out_size / a)
    for j in range(iters):
        # The reference clips both axes at the smaller of their two maxima (capped by the density limit in round 0).
        peak = m.amax(dim=-1, keepdim=True).amin(dim=1, keepdim=True)
        limit = torch.minimum(threshold, peak) if j == 0 else peak
        m = torch.minimum(m, limit)
        m = m + (out_size - m.sum(dim=-1, keepdim=True)) / a
    # The reference's cumulative sum starts from position 1 (xi[0] = 0, xi[k] = xi[k-1] + m[k]): position k spans
    # the interval (k-1, k] of the cumulative mass.
    cdf = torch.cat([torch.zeros_like(m[..., :1]), m[..., 1:].cumsum(dim=-1)], dim=-1)  # [B, 2, A]
    step = cdf[..., -1:] / (max(out_size - 1, 1) if endpoint else out_size)
    targets = torch.arange(out_size, device=m.device, dtype=m.dtype) * step  # [B, 2, out]
    j = torch.searchsorted(cdf.contiguous(), targets.contiguous(), right=False).clamp(1, a - 1)
    hi = cdf.gather(-1, j)
    lo = cdf.gather(-1, j - 1)
    pos = j.to(m.dtype) - (hi - targets) / (hi - lo).clamp_min(torch.finfo(m.dtype).tiny)
    return pos * (2.0 / (a - 1)) - 1.0


def attention_grid(
    attention: Tensor, size: int, out_size: int, dense: float = 4.0, iters: int = 5, endpoint: bool = True
) -> Tensor:
    """The sampling grid TASN's ``att_sample`` builds from one attention map per image.

    Args:
        attention: ``[B, 1, h, w]`` non-negative map (any resolution).
        size: side of the (square) image the grid will sample; the map is resized to it first, as in the reference.
        out_size: side of the resampled image.
        dense: the largest local magnification (4 in the reference).
        iters: clip-and-redistribute rounds (5 in the reference).
        endpoint: see :func:`_axis_coordinates` (``False`` reproduces the reference grid exactly).

    Returns:
        ``[B, out_size, out_size, 2]`` grid of ``(x, y)`` in ``[-1, 1]`` for ``F.grid_sample(..., align_corners=True)``.
    """
    with _fp32(attention.device):
        att = F.interpolate(attention.detach().float(), (size, size), mode="bilinear", align_corners=False)[:, 0]
        row_profile = att.amax(dim=2)  # [B, size]: each row's maximum -> where output rows go
        col_profile = att.amax(dim=1)  # [B, size]: each column's maximum -> where output columns go
        coords = _axis_coordinates(torch.stack([row_profile, col_profile], dim=1), out_size, dense, iters, endpoint)
        ys, xs = coords[:, 0], coords[:, 1]
        grid_x = xs[:, None, :].expand(-1, out_size, -1)
        grid_y = ys[:, :, None].expand(-1, -1, out_size)
        return torch.stack([grid_x, grid_y], dim=-1)


def attention_sample(
    images: Tensor, attention: Tensor, out_size: int, dense: float = 4.0, iters: int = 5, endpoint: bool = True
) -> Tensor:
    """Resamples ``images`` so that the regions ``attention`` highlights are magnified.

    Args:
        images: ``[B, C, S, S]`` square images.
        attention: ``[B, 1, h, w]`` non-negative maps.
        out_size: side of the output.
        dense: the largest magnification.
        iters: clip-and-redistribute rounds.
        endpoint: see :func:`_axis_coordinates`.

    Returns:
        ``[B, C, out_size, out_size]``, differentiable with respect to ``images``.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"attention sampling expects square images, got {tuple(images.shape[-2:])}")
    grid = attention_grid(attention, images.shape[-1], out_size, dense, iters, endpoint).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)

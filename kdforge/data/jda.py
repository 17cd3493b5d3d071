"""Joint Data Augmentation (JDA): every operation of a fixed list fires independently with probability ``p``.

Li et al., "What Role Does Data Augmentation Play in Knowledge Distillation?" (ACCV 2022) and "Multi-perspective
analysis on data augmentation in knowledge distillation" (Neurocomputing 2024); the operation list, order and
magnitude indices of CIFAR-100 are those of liwei-group/CCD ``data/datasets.py`` (JDA, p = 0.3). The operations
follow AutoAugment's PIL definitions (DeepVoltaire ``SubPolicy``: magnitude tables on a 0–9 scale, a random sign
for shear, translate and the enhancers, fill colour 128), re-implemented as batched uint8 tensor ops so the second
view is made on the training device with the rest of the batch instead of per sample in PIL worker processes.

Every colour op, rotate and integer translations match PIL pixel for pixel (tested); shear resamples with
``grid_sample``'s bicubic kernel (a = −0.75, PIL uses −0.5), so it differs from PIL by a few grey levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FILL = 128.0

# AutoAugment's magnitude tables (index 0–9).
_SHEAR = [0.3 * i / 9 for i in range(10)]
_TRANSLATE = [(150 / 331) * i / 9 for i in range(10)]
_ROTATE = [30.0 * i / 9 for i in range(10)]
_ENHANCE = [0.9 * i / 9 for i in range(10)]
_POSTERIZE = [round(8 - 4 * i / 9) for i in range(10)]
_SOLARIZE = [256.0 - 256.0 * i / 9 for i in range(10)]


def _signs(b: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(0, 2, (b,), generator=generator, device=device).float() * 2 - 1


def _grid_sample(x: Tensor, matrix: Tensor, mode: str) -> Tensor:
    """Resample ``x [B,C,H,W]`` float with PIL's affine convention: output pixel centre ``(u, v)`` reads input
    ``(a·u + b·v + c, d·u + e·v + f)`` (``matrix [B, 2, 3]`` in pixels, origin at the top-left corner); outside
    pixels get the fill colour."""
    b, _, h, w = x.shape
    v, u = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
        torch.arange(w, device=x.device, dtype=x.dtype) + 0.5,
        indexing="ij",
    )
    coords = torch.stack([u, v, torch.ones_like(u)], dim=-1).reshape(1, h * w, 3)
    src = coords @ matrix.to(x.dtype).transpose(1, 2)  # [B, HW, 2] input pixel coordinates
    grid = torch.stack([src[..., 0] / w * 2 - 1, src[..., 1] / h * 2 - 1], dim=-1).reshape(b, h, w, 2)
    # Sampling (x − fill) with zero padding and adding fill back gives PIL's constant fill colour outside.
    out = F.grid_sample(x - FILL, grid, mode=mode, padding_mode="zeros", align_corners=False) + FILL
    return out


def _affine(a: Tensor, b_: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    return torch.stack([torch.stack([a, b_, c], dim=1), torch.stack([d, e, f], dim=1)], dim=1)


def _gray(x: Tensor) -> Tensor:
    # PIL's "L" conversion: ITU-R 601-2 luma in PIL's 16-bit fixed point (L = R·299/1000 + G·587/1000 + B·114/1000).
    return ((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536).floor()


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    # PIL's Image.blend truncates to an integer before clipping.
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).floor().clamp(0, 255)


def shear_x(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    b = x.shape[0]
    s = _SHEAR[m] * _signs(b, g, x.device)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return _grid_sample(x, _affine(one, s, zero, zero, one, zero), "bicubic")


def shear_y(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    b = x.shape[0]
    s = _SHEAR[m] * _signs(b, g, x.device)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return _grid_sample(x, _affine(one, zero, zero, s, one, zero), "bicubic")


def translate_x(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    b, w = x.shape[0], x.shape[3]
    t = _TRANSLATE[m] * w * _signs(b, g, x.device)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return _grid_sample(x, _affine(one, zero, t, zero, one, zero), "bicubic")


def translate_y(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    b, h = x.shape[0], x.shape[2]
    t = _TRANSLATE[m] * h * _signs(b, g, x.device)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return _grid_sample(x, _affine(one, zero, zero, zero, one, t), "bicubic")


def rotate(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    # PIL's Image.rotate(angle): counter-clockwise about the centre, nearest neighbour; AutoAugment's
    # rotate_with_fill uses the positive angle only.
    b, _, h, w = x.shape
    theta = math.radians(_ROTATE[m])
    cos, sin = math.cos(theta), math.sin(theta)
    cx, cy = w / 2, h / 2
    # Inverse map of a counter-clockwise rotation in image coordinates (y down).
    a, b_, d, e = cos, -sin, sin, cos
    c, f = cx - a * cx - b_ * cy, cy - d * cx - e * cy
    mat = torch.tensor([[a, b_, c], [d, e, f]], device=x.device).expand(b, 2, 3)
    return _grid_sample(x, mat, "nearest")


def autocontrast(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = 255.0 / (hi - lo).clamp(min=1)
    out = ((x - lo) * scale).floor().clamp(0, 255)  # PIL's LUT truncates
    return torch.where(flat, x, out)


def equalize(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    """PIL ``ImageOps.equalize`` per channel: a LUT from the cumulative histogram with PIL's rounding."""
    b, c, h, w = x.shape
    v = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, v, torch.ones_like(v))
    # PIL: step = (total − count of the last non-empty bin) // 255; identity when step == 0.
    last = 255 - torch.flip(hist > 0, dims=[1]).long().argmax(dim=1)
    step = (h * w - hist.gather(1, last[:, None]).squeeze(1)) // 255
    cum = torch.cumsum(hist, dim=1) - hist  # count of pixels strictly below each value
    lut = ((cum + (step // 2)[:, None]) // step.clamp(min=1)[:, None]).clamp(max=255)
    out = lut.gather(1, v).reshape(b, c, h, w).to(x.dtype)
    return torch.where((step == 0).view(b, c, 1, 1), x, out)


def posterize(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    bits = _POSTERIZE[m]
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return (x.to(torch.uint8) & mask).to(x.dtype)


def solarize(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    return torch.where(x >= _SOLARIZE[m], 255.0 - x, x)


def invert(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    return 255.0 - x


def _enhance_factor(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    return 1.0 + _ENHANCE[m] * _signs(x.shape[0], g, x.device)


def color(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    return _blend(_gray(x).expand_as(x), x, _enhance_factor(x, m, g))


def contrast(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    # PIL: the degenerate image is uniform grey at the (rounded) mean of the luma.
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()
    return _blend(mean.expand_as(x), x, _enhance_factor(x, m, g))


def brightness(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    return _blend(torch.zeros_like(x), x, _enhance_factor(x, m, g))


def sharpness(x: Tensor, m: int, g: torch.Generator | None) -> Tensor:
    # PIL's SMOOTH filter (3×3, centre 5, total 13); border pixels keep their values.
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(c, 1, 3, 3)
    smooth = F.conv2d(x, k, groups=c).round()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, _enhance_factor(x, m, g))


OPS: dict[str, Callable[[Tensor, int, torch.Generator | None], Tensor]] = {
    "autocontrast": autocontrast,
    "brightness": brightness,
    "color": color,
    "contrast": contrast,
    "equalize": equalize,
    "invert": invert,
    "posterize": posterize,
    "rotate": rotate,
    "sharpness": sharpness,
    "shearX": shear_x,
    "shearY": shear_y,
    "solarize": solarize,
    "translateX": translate_x,
    "translateY": translate_y,
}

# liwei-group/CCD, CIFAR-100 JDA list (operation, magnitude index), applied in this order.
CIFAR100_OPS: tuple[tuple[str, int], ...] = (
    ("autocontrast", 2),
    ("contrast", 3),
    ("posterize", 0),
    ("solarize", 4),
    ("translateY", 8),
    ("shearX", 5),
    ("brightness", 3),
    ("shearY", 0),
    ("translateX", 1),
    ("sharpness", 5),
    ("invert", 4),
    ("color", 4),
    ("equalize", 8),
    ("rotate", 3),
)


@dataclass(frozen=True)
class JDAPolicy:
    """A JDA operation list: each ``(name, magnitude index)`` fires independently with probability ``p``."""

    ops: tuple[tuple[str, int], ...] = CIFAR100_OPS
    p: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"JDA probability must be in [0, 1], got {self.p}")
        for name, m in self.ops:
            if name not in OPS:
                raise ValueError(f"unknown JDA operation {name!r}; choose from {', '.join(sorted(OPS))}")
            if not 0 <= m <= 9:
                raise ValueError(f"JDA magnitude index of {name} must be in 0..9, got {m}")

    @classmethod
    def parse(cls, spec: Sequence[str], p: float) -> JDAPolicy:
        """From strings ``"name:magnitude"`` (the config form), e.g. ``["rotate:3", "invert:4"]``."""
        ops = []
        for item in spec:
            name, _, mag = item.partition(":")
            try:
                ops.append((name, int(mag) if mag else 0))
            except ValueError:
                raise ValueError(f"JDA operation {item!r} must look like name:magnitude, e.g. rotate:3") from None
        return cls(tuple(ops), p)


def jda_augment(images: Tensor, policy: JDAPolicy, generator: torch.Generator | None = None) -> Tensor:
    """The JDA view of a batch.

    Args:
        images: ``[B, C, H, W]`` uint8 (un-normalized, before crop/flip).
        policy: the operation list and probability.
        generator: source of randomness (on the images' device) for reproducible views.

    Returns:
        ``[B, C, H, W]`` uint8; each sample went through each operation with probability ``policy.p``.
    """
    x = images.float()
    b = x.shape[0]
    for name, m in policy.ops:
        fire = torch.rand(b, generator=generator, device=x.device) < policy.p
        # Ops are computed for the whole batch and selected per sample: no data-dependent control flow, so the
        # cost is fixed and the step never synchronises with the host.
        out = OPS[name](x, m, generator)
        x = torch.where(fire.view(b, 1, 1, 1), out.round().clamp(0, 255), x)
    return x.to(torch.uint8)


__all__ = ["CIFAR100_OPS", "OPS", "JDAPolicy", "jda_augment"]

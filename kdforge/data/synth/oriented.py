"""No-download oriented-detection data: real CIFAR objects, stretched and pasted rotated onto real-texture canvases
(docs/tasks/oriented.md §5).

Procedure (every draw from one ``torch.Generator`` seeded per split, so a seed gives identical bytes):

1. **Canvas**: a ``canvas × canvas`` image (default 96). Its background is a random ``bg_crop × bg_crop`` crop
   (default 16) of a random image of the split, upsampled bilinearly (``align_corners=False``): real colours and
   texture, magnified 6× so that no recognisable (unlabelled) object sits in the background.
2. **Objects**: ``n ~ U{min_objects … max_objects}`` (default 1–4). Object ``k`` is a random image of the split with
   its class; aspect ratio ``r ~ U[aspect]`` (default 2–4), long side ``w ~ U[long_side]`` (default 28–56 px),
   ``h = w / r``, angle ``θ ~ U[-π/2, π/2)``; its centre is uniform over the positions where the whole rectangle lies
   inside the canvas. A placement whose rectangle overlaps (positive intersection area) an already placed object is
   redrawn, up to ``tries`` times (default 20); when all fail the object is dropped (the first always fits).
3. **Paste** (exact inverse mapping): the source image is stretched to ``w × h`` and rotated by θ about the centre —
   its x axis along ``(cos θ, sin θ)``, its y axis along ``(−sin θ, cos θ)``. Each canvas pixel centre ``p`` maps back
   to box-local coordinates ``(u, v) = R(−θ)(p − c)`` and samples the source bilinearly at normalised
   ``(2u / w, 2v / h)`` (``grid_sample``, ``align_corners=False``: ±1 are the source's outer edges). The alpha mask is
   the rotated rectangle itself: pixels whose centres lie strictly inside it (:func:`rasterize_rboxes`). Objects are
   composited in placement order.
4. **Targets**: the pasted rectangle ``(cx, cy, w, h, θ)`` is le90 by construction (``w >= h``, θ in range) and exact:
   it is the rectangle the pixels were sampled from, in continuous pixel coordinates.

The train split samples train images, the test split test images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import DataError
from kdforge.ops.rotated import flip_rboxes, rasterize_rboxes, rbox_overlap, rot90_rboxes

# canvases rendered at once (each holds up to max_objects float32 [3, S, S] object images)
_RENDER_CHUNK = 256


@dataclass(frozen=True)
class OrientedSplit:
    """One split: ``images`` uint8 ``[N, 3, S, S]``, ``rboxes`` float32 ``[N, M, 5]`` le90, ``labels`` int64
    ``[N, M]`` (``-1`` = padding; the real objects come first)."""

    images: Tensor
    rboxes: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Images ``[B, 3, S, S]`` and targets ``{"rboxes": [B, M, 5], "labels": [B, M]}`` of the samples ``index``
        (on ``index``'s device), in the batch-target format of the oriented task."""
        cpu = index.cpu()
        dev = index.device
        return self.images[cpu].to(dev), {"rboxes": self.rboxes[cpu].to(dev), "labels": self.labels[cpu].to(dev)}


@dataclass(frozen=True)
class OrientedSynth:
    """Train and test splits and the class names."""

    train: OrientedSplit
    test: OrientedSplit
    classes: list[str]


def _channels_first(images: np.ndarray | Tensor) -> Tensor:
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise DataError(f"source images must be uint8 [N, 3, H, W] or [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] == 3:
        return x
    if x.shape[-1] == 3:
        return x.permute(0, 3, 1, 2).contiguous()
    raise DataError(f"source images must have 3 channels ([N, 3, H, W] or [N, H, W, 3]), got {tuple(x.shape)}")


def make_oriented_split(
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    num_images: int,
    seed: int,
    canvas: int = 96,
    min_objects: int = 1,
    max_objects: int = 4,
    aspect: tuple[float, float] = (2.0, 4.0),
    long_side: tuple[float, float] = (28.0, 56.0),
    bg_crop: int = 16,
    tries: int = 20,
) -> OrientedSplit:
    """Build one split by the procedure of the module docstring.

    Args:
        images: source images, uint8 ``[N, 3, H, W]`` (ArrayData's layout) or ``[N, H, W, 3]``.
        labels: ``[N]`` int classes.
        num_images: canvases to make.
        seed: seed of the split's generator.
        canvas: canvas side in pixels.
        min_objects, max_objects: object count range (inclusive).
        aspect: range of the long/short side ratio.
        long_side: range of the long side in pixels; must fit the canvas at every angle.
        bg_crop: side of the background crop before upsampling (``<=`` the source side).
        tries: placements tried per object before it is dropped.

    Returns:
        An :class:`OrientedSplit` with ``M = max_objects``.
    """
    src = _channels_first(images)
    lab = torch.as_tensor(np.asarray(labels)).to(torch.long)
    n_src = src.shape[0]
    if n_src == 0 or lab.shape != (n_src,):
        raise DataError(
            f"need a non-empty set of source images with one label each (got {n_src} and {tuple(lab.shape)})"
        )
    if not 1 <= min_objects <= max_objects:
        raise DataError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 1.0 <= aspect[0] <= aspect[1] or not 0 < long_side[0] <= long_side[1]:
        raise DataError(f"bad aspect {aspect} or long_side {long_side} ranges")
    if long_side[1] * math.sqrt(1 + 1 / aspect[0] ** 2) > canvas:  # the diagonal: the widest extent at any angle
        raise DataError(f"objects up to {long_side[1]} px long do not fit a {canvas}px canvas at every angle")
    if not 1 <= bg_crop <= min(src.shape[-2:]):
        raise DataError(f"bg_crop={bg_crop} must be between 1 and the source image side {min(src.shape[-2:])}")
    g = torch.Generator().manual_seed(seed)
    n, k, t = num_images, max_objects, tries
    f64 = torch.float64

    # ---- all random draws, in a fixed order
    count = torch.randint(min_objects, max_objects + 1, (n,), generator=g)
    obj_src = torch.randint(0, n_src, (n, k), generator=g)
    ratio = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(n, k, t, generator=g, dtype=f64)
    w = long_side[0] + (long_side[1] - long_side[0]) * torch.rand(n, k, t, generator=g, dtype=f64)
    h = w / ratio
    theta = (torch.rand(n, k, t, generator=g, dtype=f64) - 0.5) * math.pi  # [-π/2, π/2)
    ex = 0.5 * (w * theta.cos().abs() + h * theta.sin().abs())
    ey = 0.5 * (w * theta.sin().abs() + h * theta.cos().abs())
    cx = ex + (canvas - 2 * ex) * torch.rand(n, k, t, generator=g, dtype=f64)
    cy = ey + (canvas - 2 * ey) * torch.rand(n, k, t, generator=g, dtype=f64)
    bg_src = torch.randint(0, n_src, (n,), generator=g)
    bg_off = torch.randint(0, min(src.shape[-2:]) - bg_crop + 1, (n, 2), generator=g)
    cand = torch.stack([cx, cy, w, h, theta], dim=-1)  # [N, K, T, 5]

    # ---- placement: per slot, the first candidate that overlaps no earlier object
    placed = torch.zeros(n, k, 5, dtype=f64)
    present = torch.zeros(n, k, dtype=torch.bool)
    for slot in range(k):
        ok = torch.ones(n, t, dtype=torch.bool)
        if slot:
            clash = rbox_overlap(cand[:, slot].unsqueeze(2), placed[:, None, :slot]) & present[:, None, :slot]
            ok = ~clash.any(dim=-1)  # [N, T]
        first = ok.to(torch.uint8).argmax(dim=1)
        placed[:, slot] = cand[torch.arange(n), slot, first]
        present[:, slot] = ok.any(dim=1) & (slot < count)

    # ---- render
    out = torch.empty(n, 3, canvas, canvas, dtype=torch.uint8)
    for s in range(0, n, _RENDER_CHUNK):
        e = min(n, s + _RENDER_CHUNK)
        out[s:e] = _render(src, bg_src[s:e], bg_off[s:e], bg_crop, obj_src[s:e], placed[s:e], present[s:e], canvas)

    # ---- targets, real objects first
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices
    rboxes = torch.where(present.unsqueeze(-1), placed, torch.zeros_like(placed)).gather(
        1, order.unsqueeze(-1).expand(n, k, 5)
    )
    labels_out = torch.where(present, lab[obj_src], torch.full_like(obj_src, -1)).gather(1, order)
    return OrientedSplit(images=out, rboxes=rboxes.to(torch.float32), labels=labels_out)


def _render(
    src: Tensor,
    bg_src: Tensor,
    bg_off: Tensor,
    bg_crop: int,
    obj_src: Tensor,
    boxes: Tensor,
    present: Tensor,
    canvas: int,
) -> Tensor:
    """Composite a chunk of canvases: ``[n]`` backgrounds, ``[n, K]`` objects → uint8 ``[n, 3, S, S]``."""
    n, k = obj_src.shape
    ar = torch.arange(bg_crop)
    rows = (bg_off[:, :1] + ar).view(n, 1, bg_crop, 1)
    cols = (bg_off[:, 1:] + ar).view(n, 1, 1, bg_crop)
    crop = src[bg_src.view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows, cols].to(torch.float32)
    img = F.interpolate(crop, size=(canvas, canvas), mode="bilinear", align_corners=False)

    centres = torch.arange(canvas, dtype=torch.float32) + 0.5
    px = centres.view(1, 1, -1)
    py = centres.view(1, -1, 1)
    for slot in range(k):
        b = boxes[:, slot]
        cx, cy, w, h, t = (v.view(n, 1, 1).to(torch.float32) for v in b.unbind(-1))
        dx, dy = px - cx, py - cy
        u = dx * t.cos() + dy * t.sin()
        v = -dx * t.sin() + dy * t.cos()
        grid = torch.stack([2 * u / w, 2 * v / h], dim=-1)  # [n, S, S, 2]
        obj = F.grid_sample(
            src[obj_src[:, slot]].to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        alpha = rasterize_rboxes(b, canvas, canvas) & present[:, slot].view(n, 1, 1)
        img = torch.where(alpha.unsqueeze(1), obj, img)
    return img.round().clamp(0, 255).to(torch.uint8)


def make_oriented_synth(
    train_images: np.ndarray | Tensor,
    train_labels: np.ndarray | Tensor,
    test_images: np.ndarray | Tensor,
    test_labels: np.ndarray | Tensor,
    classes: list[str],
    num_train: int = 5000,
    num_test: int = 1000,
    seed: int = 0,
    **kwargs: object,
) -> OrientedSynth:
    """Train split from the train images (generator seed ``2·seed``), test split from the test images
    (``2·seed + 1``); ``kwargs`` go to :func:`make_oriented_split`. With ``kdforge.data._embedded_arrays()``:
    ``make_oriented_synth(d.train_images, d.train_labels, d.test_images, d.test_labels, d.classes)``."""
    train = make_oriented_split(train_images, train_labels, num_train, 2 * seed, **kwargs)  # type: ignore[arg-type]
    test = make_oriented_split(test_images, test_labels, num_test, 2 * seed + 1, **kwargs)  # type: ignore[arg-type]
    return OrientedSynth(train=train, test=test, classes=list(classes))


def random_flip_rot90(
    images: Tensor,
    rboxes: Tensor,
    labels: Tensor,
    generator: torch.Generator | None = None,
    rotate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-sample random element of the dihedral group: ``k`` quarter turns (``torch.rot90``, counter-clockwise on
    screen; ``k ∈ {0, 2}`` unless the images are square) then, with probability ½, a left-right mirror — images and
    rotated boxes together, on the images' device. Box transforms are exact (:func:`rot90_rboxes`,
    :func:`flip_rboxes`); padding rows (``label < 0``) are left as they are.

    Args:
        images: ``[B, C, H, W]`` (any dtype).
        rboxes: ``[B, M, 5]`` le90 in pixels.
        labels: ``[B, M]``, ``-1`` = padding.
        generator: randomness source on the images' device.
        rotate: draw quarter turns (else mirrors only).

    Returns:
        ``(images, rboxes)`` transformed, same shapes.
    """
    b, _, hgt, wid = images.shape
    dev = images.device
    turns = 4 if hgt == wid else 2
    k = (
        torch.randint(0, turns, (b,), generator=generator, device=dev)
        if rotate
        else torch.zeros(b, dtype=torch.long, device=dev)
    )
    if turns == 2:
        k = k * 2
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    out_img = images
    out_box = rboxes
    for kk in range(0, 4, 4 // turns if rotate else 4):
        rot_img = torch.rot90(images, kk, dims=(-2, -1)) if kk else images
        rot_box = rot90_rboxes(rboxes, kk, wid, hgt) if kk else rboxes
        for fl in (False, True):
            sel = (k == kk) & (flip == fl)
            img_v = rot_img.flip(-1) if fl else rot_img
            box_v = flip_rboxes(rot_box, rot_img.shape[-1], rot_img.shape[-2], horizontal=True) if fl else rot_box
            out_img = torch.where(sel.view(b, 1, 1, 1), img_v, out_img)
            out_box = torch.where(sel.view(b, 1, 1), box_v, out_box)
    out_box = torch.where((labels >= 0).unsqueeze(-1), out_box, rboxes)
    return out_img, out_box


__all__ = ["OrientedSplit", "OrientedSynth", "make_oriented_split", "make_oriented_synth", "random_flip_rot90"]

"""A no-download detection dataset: real CIFAR-10 objects pasted on canvases, and joint image+box augmentation.

Procedure of :func:`make_canvases` (one ``numpy.random.Generator(seed)`` drives every choice, so a seed fixes the
bytes):

1. Background: a random image of the same source split, bilinearly resized to the canvas and its contrast halved
   towards its mean colour, so it looks like real texture but pasted objects stand out from it.
2. ``k ~ U{min_objects .. max_objects}`` objects, each a random source image resized (bilinear, antialiased) to a
   side ``s ~ U{min_size .. max_size}`` px and an aspect ratio ``a ~ U[3/4, 4/3]`` (``w = s``, ``h = round(s·a)``,
   kept on the canvas), at a uniform position where it fits entirely. Its box is the pasted rectangle; its label is
   the source image's CIFAR-10 class.
3. Objects are pasted in order, later ones on top, so they may partially occlude earlier ones. A placement that
   would leave an earlier object less than ``min_visible`` (default 50 %) visible is redrawn (up to 20 tries);
   after that the object is not pasted. Every pasted object is therefore labelled and at least ``min_visible``
   visible; a partially occluded object keeps its full (amodal) box, like the pasted rectangle it is.
4. Train canvases draw only from the source train split, test canvases only from the test split.

Targets are padded to ``max_objects`` rows with label -1, the layout :class:`kdforge.tasks.detection.DetectionTask`
reads. 96×96 is the default canvas: at strides 4/8/16 it gives 24/12/6 maps, enough for 16–48 px objects, and a
resnet8 detector trains at ~0.17 GMAC per image on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from kdforge.errors import DataError


@dataclass
class DetectionCanvases:
    """Canvases and their padded targets.

    Attributes:
        images: uint8 ``[K, 3, S, S]``.
        boxes: float32 ``[K, M, 4]`` xyxy pixels (zeros on padding).
        labels: int64 ``[K, M]`` class, -1 on padding.
    """

    images: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 ``[3, H, W]`` to float32 ``[3, h, w]`` (bilinear, antialiased when shrinking)."""
    t = torch.from_numpy(img).float()[None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].numpy()


def _channels_first(images: np.ndarray) -> np.ndarray:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"source images must be uint8 [N, 3, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}")
    if images.shape[1] == 3:
        return images
    if images.shape[-1] == 3:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(f"source images must have 3 channels ([N, 3, H, W] or [N, H, W, 3]), got shape {images.shape}")


def make_canvases(
    images: np.ndarray,
    labels: np.ndarray,
    num_canvases: int,
    seed: int,
    canvas_size: int = 96,
    min_objects: int = 1,
    max_objects: int = 4,
    min_size: int = 16,
    max_size: int = 48,
    min_visible: float = 0.5,
) -> DetectionCanvases:
    """Builds ``num_canvases`` detection canvases from one split's images (procedure in the module docstring).

    Args:
        images: uint8 ``[N, 3, H, W]`` (``ArrayData`` layout) or ``[N, H, W, 3]``.
        labels: int64 ``[N]`` classes.
        num_canvases: how many canvases.
        seed: fixes every random choice.
        canvas_size: canvas side ``S``.
        min_objects, max_objects: objects per canvas (inclusive).
        min_size, max_size: object side in pixels (inclusive).
        min_visible: smallest visible fraction of a pasted object.

    Returns:
        :class:`DetectionCanvases`.
    """
    src = _channels_first(images)
    labels = np.asarray(labels, dtype=np.int64)
    if len(src) != len(labels) or len(src) < 2:
        raise DataError(
            f"need at least 2 source images with one label each, got {len(src)} images, {len(labels)} labels"
        )
    if not 1 <= min_objects <= max_objects or not 1 <= min_size <= max_size <= canvas_size:
        raise DataError("need 1 <= min_objects <= max_objects and 1 <= min_size <= max_size <= canvas_size")
    rng = np.random.default_rng(seed)
    s = canvas_size
    out_img = np.zeros((num_canvases, 3, s, s), dtype=np.uint8)
    out_box = np.zeros((num_canvases, max_objects, 4), dtype=np.float32)
    out_lab = np.full((num_canvases, max_objects), -1, dtype=np.int64)
    for c in range(num_canvases):
        bg = _resize(src[rng.integers(len(src))], s, s)
        canvas = 0.5 * bg + 0.5 * bg.mean(axis=(1, 2), keepdims=True)
        owner = np.full((s, s), -1, dtype=np.int64)  # which pasted object each pixel shows
        areas: list[int] = []
        k = int(rng.integers(min_objects, max_objects + 1))
        for _ in range(k):
            i = int(rng.integers(len(src)))
            side = int(rng.integers(min_size, max_size + 1))
            w, h = side, int(min(s, max(1, round(side * rng.uniform(0.75, 4 / 3)))))
            for _try in range(20):
                x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
                trial = owner.copy()
                trial[y0 : y0 + h, x0 : x0 + w] = len(areas)
                visible = np.bincount(trial[trial >= 0].ravel(), minlength=len(areas) + 1)
                if all(visible[j] >= min_visible * areas[j] for j in range(len(areas))):
                    break
            else:
                continue  # no placement keeps every earlier object visible enough: skip this object
            n = len(areas)
            owner = trial
            canvas[:, y0 : y0 + h, x0 : x0 + w] = _resize(src[i], h, w)
            out_box[c, n] = (x0, y0, x0 + w, y0 + h)
            out_lab[c, n] = labels[i]
            areas.append(w * h)
        out_img[c] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return DetectionCanvases(out_img, out_box, out_lab)


def make_detection_splits(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_train: int,
    num_test: int,
    seed: int,
    **kw: int | float,
) -> tuple[DetectionCanvases, DetectionCanvases]:
    """Train canvases from the train split and test canvases from the test split (seeds ``seed`` and ``seed + 1``).

    The arrays are ``ArrayData``'s (``kdforge.data._embedded_arrays()`` or ``load_jpeg_npz``); ``kw`` go to
    :func:`make_canvases`.
    """
    train = make_canvases(train_images, train_labels, num_train, seed, **kw)  # type: ignore[arg-type]
    test = make_canvases(test_images, test_labels, num_test, seed + 1, **kw)  # type: ignore[arg-type]
    return train, test


def augment_detection(
    images: Tensor,
    boxes: Tensor,
    labels: Tensor,
    generator: torch.Generator | None = None,
    flip_p: float = 0.5,
    scale_range: tuple[float, float] = (0.75, 1.25),
    min_box_size: float = 4.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Joint random flip and scale jitter + crop of images and boxes, batched on the images' device.

    Each image is flipped horizontally with probability ``flip_p``, scaled by ``r ~ U[scale_range]`` about its
    top-left corner and shifted by a uniform offset so the output window (same size) lies inside the scaled image
    (``r >= 1``) or the scaled image inside the window (``r < 1``, zero padding). Boxes follow the same map, are
    clipped to the window, and a box narrower or shorter than ``min_box_size`` px after clipping becomes padding
    (label -1, zero box).

    Args:
        images: float ``[B, C, H, W]``.
        boxes: ``[B, M, 4]`` xyxy pixels.
        labels: int64 ``[B, M]`` (-1 padding).
        generator: source of randomness (on the images' device).
        flip_p: flip probability.
        scale_range: scale factor range.
        min_box_size: smallest kept box side after clipping.

    Returns:
        ``(images, boxes, labels)`` of the same shapes.
    """
    b, _, h, w = images.shape
    dev, dt = images.device, images.dtype
    flip = torch.rand(b, generator=generator, device=dev) < flip_p
    lo, hi = scale_range
    r = lo + (hi - lo) * torch.rand(b, generator=generator, device=dev)
    u = torch.rand(b, 2, generator=generator, device=dev)
    size = torch.tensor([w, h], device=dev, dtype=torch.float32)
    slack = (r[:, None] - 1) * size  # scaled size minus window size, per axis
    off = torch.minimum(slack, torch.zeros_like(slack)) + u * slack.abs()  # offset of the window in scaled coords

    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    fx1 = torch.where(flip[:, None], w - x2, x1)
    fx2 = torch.where(flip[:, None], w - x1, x2)
    boxes = torch.stack((fx1, y1, fx2, y2), dim=-1)

    # input = (output + off) / r in pixel-edge coordinates; affine_grid works in [-1, 1] (align_corners=False)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=torch.float32)
    theta[:, 0, 0] = 1 / r
    theta[:, 1, 1] = 1 / r
    theta[:, :, 2] = 1 / r[:, None] + 2 * off / (r[:, None] * size) - 1
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(dt)

    offs = torch.cat((off, off), dim=-1)[:, None, :]
    limit = torch.cat((size, size))
    boxes = torch.minimum((boxes * r[:, None, None] - offs).clamp(min=0), limit)
    keep = (labels >= 0) & ((boxes[..., 2:] - boxes[..., :2]) >= min_box_size).all(-1)
    boxes = torch.where(keep[..., None], boxes, torch.zeros_like(boxes))
    labels = torch.where(keep, labels, torch.full_like(labels, -1))
    return images, boxes, labels


__all__ = ["DetectionCanvases", "augment_detection", "make_canvases", "make_detection_splits"]

"""CIFAR-10 segmentation canvases: real CIFAR objects pasted through random shapes onto real-image backgrounds.

The procedure (docs/tasks/segmentation.md, "Synthetic CIFAR-10 canvases"), per canvas, from one seeded
``numpy.random.Generator``:

1. **Background.** A random source image; a random 12×12 window of it is bilinearly upsampled to the canvas and
   box-blurred (5×5), giving a smooth texture with real image colours and no object-level detail. Label 0.
2. **Objects.** 1–3 objects (uniform). Each is another random source image, bilinearly resized to a side of
   ``U[0.5, 0.85]`` × canvas and placed uniformly inside the canvas, and pasted through a random shape mask:
   an ellipse (semi-axes ``U[0.3, 0.5]`` × side, random rotation) or a star-convex polygon (5–8 vertices at sorted
   random angles, radii ``U[0.25, 0.5]`` × side). Later objects occlude earlier ones (paint order = depth order).
   Label ``CIFAR class + 1``, so the label space is 11 classes with 0 = background.

Train canvases draw their sources from the train split, test canvases from the test split (seed ``seed`` and
``seed + 1``), so no source image is shared between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from kdforge.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: label names of the canvases: class 0 is the background, CIFAR class ``c`` becomes ``c + 1``
SEG_CLASSES = ["background", *CIFAR10_CLASSES]


@dataclass
class SegArrays:
    """A segmentation split held in memory.

    Attributes:
        images: ``[N, 3, S, S]`` uint8.
        masks: ``[N, S, S]`` uint8 class indices (no ignore pixels).
        classes: the K class names (index = label).
    """

    images: np.ndarray
    masks: np.ndarray
    classes: list[str]


def _to_hwc(images: np.ndarray) -> np.ndarray:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(
            f"source images must be uint8 [N, 32, 32, 3] or [N, 3, 32, 32]; got {images.dtype} {images.shape}"
        )
    if images.shape[-1] == 3:
        return images
    if images.shape[1] == 3:
        return images.transpose(0, 2, 3, 1)
    raise DataError(f"source images must be uint8 [N, 32, 32, 3] or [N, 3, 32, 32]; got shape {images.shape}")


def _resize(img: np.ndarray, size: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR, box=box))


def _box_blur(img: np.ndarray, k: int) -> np.ndarray:
    """Separable ``k × k`` mean filter with edge padding, ``[S, S, 3]`` float32."""
    pad = k // 2
    x = np.pad(img.astype(np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    c = np.cumsum(np.pad(x, ((1, 0), (0, 0), (0, 0))), axis=0)
    x = (c[k:] - c[:-k]) / k
    c = np.cumsum(np.pad(x, ((0, 0), (1, 0), (0, 0))), axis=1)
    return (c[:, k:] - c[:, :-k]) / k


def ellipse_mask(side: int, rng: np.random.Generator) -> np.ndarray:
    """A random rotated ellipse centred in a ``side × side`` box, bool ``[side, side]``."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5 - side / 2
    a, b = rng.uniform(0.3, 0.5, size=2) * side
    phi = rng.uniform(0, np.pi)
    u = xx * np.cos(phi) + yy * np.sin(phi)
    v = -xx * np.sin(phi) + yy * np.cos(phi)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def rasterize_polygon(vx: np.ndarray, vy: np.ndarray, side: int) -> np.ndarray:
    """Pixels of a ``side × side`` grid whose centres lie inside the polygon (even-odd rule), bool ``[side, side]``.

    Args:
        vx, vy: ``[V]`` vertex coordinates in pixels (pixel ``(r, c)`` has its centre at ``(c + 0.5, r + 0.5)``).
        side: grid side.
    """
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    inside = np.zeros((side, side), dtype=bool)
    for i in range(len(vx)):
        x0, y0, x1, y1 = vx[i], vy[i], vx[i - 1], vy[i - 1]
        crosses = (y0 > yy) != (y1 > yy)  # the edge straddles the pixel's row: never a horizontal edge
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x1 - x0) * (yy - y0) / (y1 - y0) + x0
        inside ^= crosses & (xx < x_at)
    return inside


def polygon_vertices(side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random star-convex polygon centred in a ``side × side`` box: 5–8 vertices at sorted random angles, radii
    ``U[0.25, 0.5]`` × side. Returns ``(vx, vy)``."""
    n = int(rng.integers(5, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    rad = rng.uniform(0.25, 0.5, size=n) * side
    return side / 2 + rad * np.cos(ang), side / 2 + rad * np.sin(ang)


def polygon_mask(side: int, rng: np.random.Generator) -> np.ndarray:
    """A random star-convex polygon (:func:`polygon_vertices`) rasterized, bool ``[side, side]``."""
    vx, vy = polygon_vertices(side, rng)
    return rasterize_polygon(vx, vy, side)


def make_canvas(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: int = 64, max_objects: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """One canvas: ``(image [S, S, 3] uint8, mask [S, S] uint8)`` by the module's procedure."""
    n = len(images)
    bg = images[rng.integers(n)]
    x0, y0 = rng.uniform(0, 32 - 12, size=2)
    canvas = _box_blur(_resize(bg, size, box=(x0, y0, x0 + 12, y0 + 12)), 5)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        k = rng.integers(n)
        side = int(rng.integers(round(0.5 * size), round(0.85 * size) + 1))
        obj = _resize(images[k], side).astype(np.float32)
        shape = ellipse_mask(side, rng) if rng.random() < 0.5 else polygon_mask(side, rng)
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        region = (slice(top, top + side), slice(left, left + side))
        canvas[region][shape] = obj[shape]
        mask[region][shape] = int(labels[k]) + 1
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask


def make_segmentation_canvases(
    images: np.ndarray, labels: np.ndarray, count: int, size: int = 64, seed: int = 0, max_objects: int = 3
) -> SegArrays:
    """``count`` canvases from the source images, deterministic per ``seed``.

    Args:
        images: source images, uint8 ``[N, 32, 32, 3]`` or ``[N, 3, 32, 32]``.
        labels: ``[N]`` CIFAR-10 labels ``0..9``.
        count: number of canvases.
        size: canvas side S (≥ 16).
        seed: the seed of the whole split.
        max_objects: at most this many objects per canvas (at least 1).

    Returns:
        :class:`SegArrays` with 11 classes.
    """
    hwc = _to_hwc(images)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(hwc) < 2 or len(labels) != len(hwc):
        raise DataError(
            f"need at least 2 source images with one label each; got {len(hwc)} images, {len(labels)} labels"
        )
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"source labels must be CIFAR-10 classes 0..9; got {labels.min()}..{labels.max()}")
    if size < 16 or max_objects < 1 or count < 1:
        raise DataError(f"need size >= 16, max_objects >= 1, count >= 1; got {size}, {max_objects}, {count}")
    rng = np.random.default_rng(seed)
    out_img = np.empty((count, 3, size, size), dtype=np.uint8)
    out_mask = np.empty((count, size, size), dtype=np.uint8)
    for i in range(count):
        img, m = make_canvas(hwc, labels, rng, size, max_objects)
        out_img[i] = img.transpose(2, 0, 1)
        out_mask[i] = m
    return SegArrays(out_img, out_mask, list(SEG_CLASSES))


def cifar_segmentation_splits(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_train: int = 5000,
    num_test: int = 1000,
    size: int = 64,
    seed: int = 0,
) -> tuple[SegArrays, SegArrays]:
    """Train canvases from the train split (seed ``seed``), test canvases from the test split (seed ``seed + 1``).

    Works from ``kdforge.data._embedded_arrays()`` (``ArrayData``: ``[N, 3, 32, 32]`` uint8) or the JPEG ``.npz``.
    """
    train = make_segmentation_canvases(train_images, train_labels, num_train, size, seed)
    test = make_segmentation_canvases(test_images, test_labels, num_test, size, seed + 1)
    return train, test


__all__ = [
    "SEG_CLASSES",
    "SegArrays",
    "cifar_segmentation_splits",
    "ellipse_mask",
    "make_canvas",
    "make_segmentation_canvases",
    "polygon_mask",
    "polygon_vertices",
    "rasterize_polygon",
]

"""Scene canvases for DATS: one small labelled CIFAR-10 object among distractors, where the details decide.

Remote-sensing scene classifiers (DATS, TASN) earn their keep when the label is carried by a small region of a large
image. This builder makes such images from real photographs, with no download:

1. **Background.** A random image of the source split (any class), bilinearly upsampled to the canvas and dimmed by
   a factor in [0.5, 0.9]: a large, blurred and often recognisable scene whose class is unrelated to the label, a
   cue the classifier has to learn to ignore in favour of the small object.
2. **Distractors.** ``distractors`` patches cut from other random images, each split into a 4×4 grid of tiles that are
   shuffled, so they keep natural colour and edge statistics but carry no object. Each is pasted at a random scale
   in ``object_size`` and a random position.
3. **The object.** One source image, whose label becomes the scene's label, resized to a side drawn from
   ``object_size`` and pasted last (on top) at a random position fully inside the canvas. Its box is returned.

At the default 96×96 canvas and 20–32 px objects, the object covers 4–11 % of the image: a network that looks at
the whole image at low resolution loses most of it, which is the situation attention sampling is built for.
Everything is drawn from one ``numpy.random.Generator`` seeded by ``seed``, so the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdforge.errors import DataError


@dataclass(frozen=True)
class SceneSet:
    """Scene canvases.

    Attributes:
        images: ``[N, 3, S, S]`` uint8.
        labels: ``[N]`` int64, the pasted object's class.
        boxes: ``[N, 4]`` int64 ``(x0, y0, x1, y1)`` of the object (exclusive ends).
        source_index: ``[N]`` int64, which source image is the object.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    source_index: np.ndarray


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(img).float()[None]
    out = F.interpolate(t, (size, size), mode="bilinear", align_corners=False, antialias=size < img.shape[-1])
    return out[0].round().clamp(0, 255).to(torch.uint8).numpy()


def _scrambled(img: np.ndarray, rng: np.random.Generator, tiles: int = 4) -> np.ndarray:
    c, h, w = img.shape
    th, tw = h // tiles, w // tiles
    blocks = img[:, : th * tiles, : tw * tiles].reshape(c, tiles, th, tiles, tw).transpose(1, 3, 0, 2, 4)
    blocks = blocks.reshape(tiles * tiles, c, th, tw)[rng.permutation(tiles * tiles)]
    return blocks.reshape(tiles, tiles, c, th, tw).transpose(2, 0, 3, 1, 4).reshape(c, th * tiles, tw * tiles)


def make_scenes(
    images: np.ndarray,
    labels: np.ndarray,
    n: int,
    *,
    seed: int,
    canvas: int = 96,
    object_size: tuple[int, int] = (20, 32),
    distractors: tuple[int, int] = (2, 4),
) -> SceneSet:
    """Builds ``n`` scene canvases from ``images`` (one split of CIFAR-10, or any small labelled images).

    Args:
        images: ``[M, 3, H, W]`` uint8 source images (``ArrayData.train_images`` or ``test_images``).
        labels: ``[M]`` int64.
        n: number of canvases; object images are drawn without replacement while ``n <= M``.
        seed: the only source of randomness.
        canvas: side of the square canvas.
        object_size: inclusive range of the pasted object's side, in pixels.
        distractors: inclusive range of the number of distractor patches.

    Returns:
        A :class:`SceneSet`.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise DataError(f"scene sources must be uint8 [N, 3, H, W] images, got {images.dtype} {images.shape}")
    m = len(images)
    if m < 2 or len(labels) != m:
        raise DataError(f"scene sources need at least 2 images with one label each (got {m} images, {len(labels)})")
    lo, hi = object_size
    if not (1 <= lo <= hi <= canvas):
        raise DataError(f"object_size {object_size} must satisfy 1 <= low <= high <= canvas ({canvas})")
    rng = np.random.default_rng(seed)
    objects = rng.permutation(m)[:n] if n <= m else rng.integers(0, m, n)
    out = np.empty((n, 3, canvas, canvas), dtype=np.uint8)
    boxes = np.empty((n, 4), dtype=np.int64)
    for i, obj in enumerate(objects):
        bg = _resize(images[rng.integers(m)], canvas).astype(np.float32) * rng.uniform(0.5, 0.9)
        scene = bg.round().astype(np.uint8)
        for _ in range(rng.integers(distractors[0], distractors[1] + 1)):
            side = int(rng.integers(lo, hi + 1))
            patch = _resize(_scrambled(images[rng.integers(m)], rng), side)
            y, x = rng.integers(0, canvas - side + 1, 2)
            scene[:, y : y + side, x : x + side] = patch
        side = int(rng.integers(lo, hi + 1))
        y, x = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
        scene[:, y : y + side, x : x + side] = _resize(images[obj], side)
        out[i] = scene
        boxes[i] = (x, y, x + side, y + side)
    return SceneSet(out, labels[objects].astype(np.int64), boxes, objects.astype(np.int64))

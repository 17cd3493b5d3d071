"""A receipt / non-receipt image-folder dataset, rendered over real photographs (no download).

The receipt-identification system that kdforge takes as its deployment example sorts a city super-app's photo
uploads into receipts and everything else. This builder makes a stand-in that exercises the same pipeline (image
folders in, a small exported student out) and can be replaced by a user's own photos without changing a command.

A **receipt** image is a real photograph (a random CIFAR-10 image, upsampled) with a paper strip on it: an off-white
rectangle (40–65 % of the canvas wide, 65–95 % high) carrying a shop name, 3–9 item lines of the form
``NAME .... 12.34``, a rule and a ``TOTAL`` line, drawn with Pillow's built-in font in dark grey, then rotated by up
to ±25° about its centre and pasted at a random position that keeps its centre inside the middle half of the
canvas. An **other** image is a real photograph alone (half of them), or with a distractor that looks like paper but
is not a receipt (the other half): a blank off-white card, or a framed print (another photograph with a white
border), rotated and placed the same way. Every image then gets the same photometric treatment: a linear lighting
gradient (0.6–1.15 across the image, random direction), Gaussian sensor noise (σ 0–6 grey levels) and JPEG-free
8-bit rounding. Classes are balanced. Every draw comes from one ``numpy.random.Generator`` seeded per split, so the
same seed writes the same bytes.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kdforge.errors import DataError

CLASSES = ("other", "receipt")


def _photo(images: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    img = images[rng.integers(len(images))].transpose(1, 2, 0)
    return Image.fromarray(img).resize((size, size), Image.BILINEAR)


def _word(rng: np.random.Generator, lo: int, hi: int) -> str:
    return "".join(rng.choice(list(string.ascii_uppercase), int(rng.integers(lo, hi + 1))))


def _paper(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    tone = int(rng.integers(225, 256))
    return Image.new("RGB", (w, h), (tone, tone, max(tone - int(rng.integers(0, 15)), 0)))


def _receipt(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    paper = _paper(rng, w, h)
    draw = ImageDraw.Draw(paper)
    font = ImageFont.load_default()
    ink = (int(rng.integers(20, 80)),) * 3
    line = 11  # the built-in bitmap font is 11 px tall
    y = 4
    draw.text((4, y), _word(rng, 4, 8), fill=ink, font=font)
    y += line + 3
    total = 0.0
    for _ in range(int(rng.integers(3, 10))):
        if y + 2 * line + 8 > h:
            break
        price = float(rng.integers(10, 9999)) / 100
        total += price
        draw.text((4, y), f"{_word(rng, 3, 6)} {price:6.2f}", fill=ink, font=font)
        y += line
    draw.line((4, y + 2, w - 4, y + 2), fill=ink, width=1)
    draw.text((4, y + 5), f"TOTAL {total:7.2f}", fill=ink, font=font)
    return paper


def _card(rng: np.random.Generator, images: np.ndarray, w: int, h: int) -> Image.Image:
    if rng.random() < 0.5:
        return _paper(rng, w, h)
    border = max(2, min(w, h) // 10)
    card = _paper(rng, w, h)
    card.paste(_photo(images, rng, max(min(w, h) - 2 * border, 1)), (border, border))
    return card


def _place(canvas: Image.Image, item: Image.Image, rng: np.random.Generator) -> None:
    angle = float(rng.uniform(-25, 25))
    rotated = item.rotate(angle, resample=Image.BILINEAR, expand=True)
    mask = Image.new("L", item.size, 255).rotate(angle, resample=Image.BILINEAR, expand=True)
    size = canvas.size[0]
    cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4 + 1, 2))
    canvas.paste(rotated, (cx - rotated.size[0] // 2, cy - rotated.size[1] // 2), mask)


def _photometric(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    size = a.shape[0]
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    ramp = xx * np.cos(theta) + yy * np.sin(theta)  # in [-0.71, 0.71]
    lo, hi = rng.uniform(0.6, 0.85), rng.uniform(0.95, 1.15)
    gain = lo + (hi - lo) * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    a = a * gain[..., None] + rng.normal(0, rng.uniform(0, 6), a.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def render_receipt_image(images: np.ndarray, receipt: bool, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One ``[size, size, 3]`` uint8 image of the class ``receipt`` (True) or ``other`` (False)."""
    canvas = _photo(images, rng, size)
    w = int(size * rng.uniform(0.40, 0.65))
    h = int(size * rng.uniform(0.65, 0.95))
    if receipt:
        _place(canvas, _receipt(rng, w, h), rng)
    elif rng.random() < 0.5:
        _place(canvas, _card(rng, images, w, h), rng)
    return _photometric(canvas, rng)


def write_receipt_folder(
    root: str | Path,
    images_by_split: dict[str, np.ndarray],
    per_class: dict[str, int],
    *,
    seed: int = 0,
    size: int = 128,
) -> Path:
    """Writes ``root/<split>/{other,receipt}/NNNNN.png``, the image-folder layout ``data.name=folder`` reads.

    Args:
        root: output folder; must not already hold a ``train`` or ``val`` folder (nothing is overwritten).
        images_by_split: background photographs per split, ``[N, 3, H, W]`` uint8 (e.g. CIFAR-10 train for
            ``train`` and test for ``val``, so no photograph appears in both splits).
        per_class: images per class and split, e.g. ``{"train": 1000, "val": 200}``.
        seed: split ``k`` (in sorted order) draws from ``default_rng([seed, k])``.
        size: side of the square images.

    Returns:
        ``root`` as a :class:`Path`.
    """
    root = Path(root)
    for split in per_class:
        if split not in images_by_split:
            raise DataError(f"no background images given for split {split!r}")
        if (root / split).exists():
            raise DataError(f"{root / split} already exists; choose an empty output folder or delete it")
    for k, split in enumerate(sorted(per_class)):
        rng = np.random.default_rng([seed, k])
        images = images_by_split[split]
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise DataError(f"backgrounds for {split!r} must be uint8 [N, 3, H, W], got {images.dtype} {images.shape}")
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
        for i in range(per_class[split]):
            for label, name in enumerate(CLASSES):
                img = render_receipt_image(images, bool(label), rng, size)
                Image.fromarray(img).save(root / split / name / f"{i:05d}.png")
    return root

"""Pictures of segmentation masks: a grid of input, predictions and ground truth per image, in a fixed palette.

The panels are composed pixel by pixel in numpy (each mask pixel an exact ``scale × scale`` block of its class
colour) and placed unresampled in the PNG; matplotlib only writes the text. So a panel's colours in the file are
exactly the palette colours of the class map drawn, which the tests check against the model's argmax.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.engine.checkpoint import atomic_write_bytes
from kdforge.errors import KDForgeError

#: The colour of ignored pixels (label 255): the Pascal VOC "void" colour.
IGNORE_COLOR = (224, 224, 192)

# Layout in PNG pixels.
_MARGIN, _GUTTER, _HEADER, _TITLE, _CAPTION = 12, 8, 22, 30, 16
_SWATCH, _LEGEND_ROW = 14, 20
_DPI = 100
_BACKGROUND = 255


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: class ``k``'s RGB from the bits of ``k`` (0 black, 1 dark red, 2 dark green, ...).

    The VOC devkit's ``labelcolormap`` (VOCdevkit ``VOClabelcolormap.m``, also mmseg's and the VOC PNG masks'
    palette): bit ``3j`` of ``k`` goes to bit ``7 − j`` of red, bit ``3j+1`` to green, ``3j+2`` to blue. Any class
    count gets distinct colours, the same for every run and dataset.

    Args:
        num_colors: how many entries.

    Returns:
        ``[num_colors, 3]`` uint8.
    """
    out = np.zeros((num_colors, 3), dtype=np.uint8)
    for k in range(num_colors):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[k] = (r, g, b)
    return out


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """A class map as an RGB picture.

    Args:
        mask: ``[H, W]`` integer class indices, ``ignore_index`` for unlabelled pixels.
        palette: ``[K, 3]`` uint8 colours of classes ``0..K-1``.
        ignore_index: drawn in :data:`IGNORE_COLOR`.

    Returns:
        ``[H, W, 3]`` uint8.
    """
    mask = np.asarray(mask)
    ignored = mask == ignore_index
    bad = ~ignored & ((mask < 0) | (mask >= len(palette)))
    if bad.any():
        raise KDForgeError(
            f"mask holds class {int(mask[bad][0])} but the palette has {len(palette)} colours; "
            "labels must be 0..num_classes-1 or the ignore index"
        )
    rgb = palette[np.where(ignored, 0, mask)]
    rgb[ignored] = IGNORE_COLOR
    return rgb


@dataclass(frozen=True)
class MaskGrid:
    """A written picture and where each panel is in it.

    Attributes:
        path: the PNG.
        width, height: its size in pixels.
        columns: the column titles, left to right (the first is the input).
        boxes: ``(row, column title) -> (x0, y0, x1, y1)``, the panel's pixels ``[y0:y1, x0:x1]`` in the PNG.
        scale: each image pixel is a ``scale × scale`` block (images larger than the cell are subsampled instead:
            then ``stride`` > 1 and ``scale`` = 1).
        stride: every ``stride``-th image pixel is drawn.
        legend: the classes shown in the legend (index, name), in order.
    """

    path: Path
    width: int
    height: int
    columns: tuple[str, ...]
    boxes: dict[tuple[int, str], tuple[int, int, int, int]]
    scale: int
    stride: int
    legend: tuple[tuple[int, str], ...] = field(default=())


def _fit(side: int, cell: int) -> tuple[int, int]:
    """``(scale, stride)`` drawing a ``side``-pixel image in about ``cell`` pixels: upscale small, subsample big."""
    if side <= cell:
        return max(1, cell // side), 1
    return 1, math.ceil(side / cell)


def _resize(image: np.ndarray, scale: int, stride: int) -> np.ndarray:
    image = image[::stride, ::stride]
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1) if scale > 1 else image


def write_mask_grid(
    images: Sequence[np.ndarray],
    panels: Mapping[str, Sequence[np.ndarray]],
    class_names: Sequence[str],
    path: str | Path,
    *,
    ignore_index: int = 255,
    title: str = "",
    captions: Mapping[tuple[int, str], str] | None = None,
    input_title: str = "input",
    cell: int = 192,
) -> MaskGrid:
    """One row per image: the input, then one class-map panel per entry of ``panels``; a class legend below.

    Args:
        images: N RGB inputs ``[H_i, W_i, 3]`` uint8 (sizes may differ between rows).
        panels: column title → N class maps ``[H_i, W_i]`` (predictions, ground truth), in column order.
        class_names: the K class names; class ``k`` is drawn in ``voc_palette()[k]``.
        path: the PNG to write.
        ignore_index: the label drawn as "ignore".
        title: a line above the grid.
        captions: ``(row, column title) -> text`` under that panel (e.g. a per-image accuracy).
        input_title: the first column's title.
        cell: the panel side to aim for, in pixels.

    Returns:
        Where everything went (see :class:`MaskGrid`).
    """
    if not images:
        raise KDForgeError("no images to draw; ask for at least one picture")
    for name, maps in panels.items():
        if len(maps) != len(images):
            raise KDForgeError(f"panel '{name}' has {len(maps)} masks for {len(images)} images; give one per image")
        for i, m in enumerate(maps):
            if tuple(m.shape) != tuple(images[i].shape[:2]):
                raise KDForgeError(
                    f"panel '{name}' row {i}: mask {tuple(m.shape)} does not match image {tuple(images[i].shape[:2])}"
                )
    palette = voc_palette(max(256, len(class_names)))
    captions = dict(captions or {})
    columns = (input_title, *panels)
    side = max(max(im.shape[0], im.shape[1]) for im in images)
    scale, stride = _fit(side, cell)
    cell_h = max(_resize(im, scale, stride).shape[0] for im in images)
    cell_w = max(_resize(im, scale, stride).shape[1] for im in images)
    row_h = cell_h + (_CAPTION if captions else 0) + _GUTTER

    # The legend: every class that appears in a drawn map, then "ignore" if any pixel is ignored.
    present: set[int] = set()
    for maps in panels.values():
        for m in maps:
            present.update(int(v) for v in np.unique(m))
    legend = [(k, class_names[k] if k < len(class_names) else str(k)) for k in sorted(present - {ignore_index})]
    if ignore_index in present:
        legend.append((ignore_index, "ignore"))
    width = 2 * _MARGIN + len(columns) * cell_w + (len(columns) - 1) * _GUTTER
    entry_w = _SWATCH + 6 + 7 * max((len(name) for _, name in legend), default=4) + 14
    per_line = max(1, (width - 2 * _MARGIN) // entry_w)
    legend_h = _LEGEND_ROW * math.ceil(len(legend) / per_line) if legend else 0
    top = _MARGIN + (_TITLE if title else 0) + _HEADER
    height = top + len(images) * row_h + legend_h + _MARGIN

    canvas = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    boxes: dict[tuple[int, str], tuple[int, int, int, int]] = {}
    for i, image in enumerate(images):
        y0 = top + i * row_h
        pictures = [image.astype(np.uint8)] + [colorize(maps[i], palette, ignore_index) for maps in panels.values()]
        for j, (name, picture) in enumerate(zip(columns, pictures, strict=True)):
            drawn = _resize(picture, scale, stride)
            x0 = _MARGIN + j * (cell_w + _GUTTER)
            canvas[y0 : y0 + drawn.shape[0], x0 : x0 + drawn.shape[1]] = drawn
            boxes[(i, name)] = (x0, y0, x0 + drawn.shape[1], y0 + drawn.shape[0])
    legend_top = top + len(images) * row_h
    for n, (k, _) in enumerate(legend):
        x0 = _MARGIN + (n % per_line) * entry_w
        y0 = legend_top + (n // per_line) * _LEGEND_ROW
        color = IGNORE_COLOR if k == ignore_index else tuple(palette[k])
        canvas[y0 : y0 + _SWATCH, x0 : x0 + _SWATCH] = (90, 90, 90)  # a frame, so black and white classes show
        canvas[y0 + 1 : y0 + _SWATCH - 1, x0 + 1 : x0 + _SWATCH - 1] = color

    plt = _pyplot()
    fig = plt.figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    try:
        # Pixels placed 1:1, not resampled: the figure is exactly the canvas at the save dpi.
        fig.figimage(canvas, 0, 0, origin="upper", resize=False)

        def text(x: float, y: float, s: str, **kw: object) -> None:
            fig.text(x / width, 1 - y / height, s, **kw)

        if title:
            text(_MARGIN, _MARGIN + _TITLE / 2 - 2, title, fontsize=11, va="center", weight="bold")
        for j, name in enumerate(columns):
            x = _MARGIN + j * (cell_w + _GUTTER) + cell_w / 2
            text(x, top - _HEADER / 2, name, fontsize=9, ha="center", va="center")
        for (i, name), caption in captions.items():
            x0, _, x1, y1 = boxes[(i, name)]
            text((x0 + x1) / 2, y1 + _CAPTION / 2 + 1, caption, fontsize=8, ha="center", va="center", color="0.25")
        for n, (_, name) in enumerate(legend):
            x0 = _MARGIN + (n % per_line) * entry_w
            y0 = legend_top + (n // per_line) * _LEGEND_ROW
            text(x0 + _SWATCH + 5, y0 + _SWATCH / 2, name, fontsize=8, va="center")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=_DPI)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return MaskGrid(Path(path), width, height, columns, boxes, scale, stride, tuple(legend))


def _pyplot() -> Any:
    """matplotlib's pyplot, imported only when a picture is drawn, on the off-screen backend."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; never open a window
    import matplotlib.pyplot as plt

    return plt


__all__ = ["IGNORE_COLOR", "MaskGrid", "colorize", "voc_palette", "write_mask_grid"]

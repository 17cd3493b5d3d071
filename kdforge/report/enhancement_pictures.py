"""Enhancement picture grids: low-light input, teacher, student and ground truth side by side, one row per image.

Pure PIL (no plotting library): the grid is the images themselves at an integer zoom (nearest neighbour, so no
resampling blurs what is compared), with a thin white gutter, and each image's PSNR to the ground truth in a caption
strip under it. The PSNR is the task's metric (:func:`kdforge.ops.image_metrics.psnr`, data range 1).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from kdforge.engine.checkpoint import atomic_write_bytes
from kdforge.ops.image_metrics import psnr

#: column titles of :func:`enhancement_grid`
COLUMNS = ("low-light input", "teacher", "student", "ground truth")
GUTTER = 4
CAPTION = 14


def _to_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] (clamped) → ``[H, W, 3]`` uint8."""
    return image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def enhancement_grid(columns: Sequence[Tensor], titles: Sequence[str] = COLUMNS, zoom: int = 4) -> Image.Image:
    """A grid with one column per tensor of ``columns`` and one row per image.

    Args:
        columns: ``K`` tensors ``[N, 3, H, W]`` in [0, 1] (e.g. input, teacher, student, ground truth); the last one
            is the reference of the PSNR captions (its own caption is its title only).
        titles: ``K`` column titles, drawn in the header strip.
        zoom: integer nearest-neighbour magnification (CIFAR's 32 px are small on a screen).

    Returns:
        An RGB ``PIL.Image``.
    """
    if not columns or len(columns) != len(titles):
        raise ValueError(f"{len(columns)} columns for {len(titles)} titles; give one title per column")
    shape = columns[0].shape
    if len(shape) != 4 or shape[1] != 3 or any(c.shape != shape for c in columns):
        raise ValueError(f"columns must share one [N, 3, H, W] shape, got {[tuple(c.shape) for c in columns]}")
    if zoom < 1:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    n, _, h, w = shape
    zh, zw = h * zoom, w * zoom
    reference = columns[-1].float()
    width = len(columns) * (zw + GUTTER) + GUTTER
    height = CAPTION + n * (zh + CAPTION + GUTTER) + GUTTER
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (column, title) in enumerate(zip(columns, titles, strict=True)):
        x0 = GUTTER + k * (zw + GUTTER)
        draw.text((x0, 1), title, fill="black")
        scores = psnr(column.float().clamp(0, 1), reference) if k < len(columns) - 1 else None
        for i in range(n):
            y0 = CAPTION + i * (zh + CAPTION + GUTTER) + GUTTER
            tile = Image.fromarray(_to_uint8(column[i])).resize((zw, zh), Image.NEAREST)
            canvas.paste(tile, (x0, y0))
            if scores is not None:
                draw.text((x0, y0 + zh + 1), f"{float(scores[i]):.2f} dB", fill="black")
    return canvas


@torch.no_grad()
def enhancement_pictures(
    student: nn.Module,
    teacher: nn.Module | None,
    low: Tensor,
    clean: Tensor,
    path: str | Path,
    zoom: int = 4,
    baseline: nn.Module | None = None,
) -> Path:
    """Write the grid of ``low`` → teacher, (student alone,) student → ``clean`` as a PNG (atomically).

    Args:
        student, teacher: enhancers ``[N, 3, H, W]`` → ``[N, 3, H, W]``, run in eval mode on the inputs' device
            (``teacher=None`` leaves its column out).
        low: ``[N, 3, H, W]`` raw [0, 1] inputs (the enhancement task's convention).
        clean: ``[N, 3, H, W]`` ground truth in [0, 1].
        path: the ``.png`` to write.
        zoom: see :func:`enhancement_grid`.
        baseline: the same student architecture trained alone, drawn before the (distilled) student so the two can
            be compared; the columns are then titled "student alone" and "distilled student".

    Returns:
        ``path``.
    """
    columns, titles = [low], [COLUMNS[0]]
    nets = [("teacher", teacher)]
    nets += (
        [("student alone", baseline), ("distilled student", student)]
        if baseline is not None
        else [("student", student)]
    )
    for name, net in nets:
        if net is None:
            continue
        was_training = net.training
        net.eval()
        columns.append(net(low).clamp(0, 1))  # the task's prediction: the output clamped to [0, 1]
        titles.append(name)
        net.train(was_training)
    columns.append(clean)
    titles.append(COLUMNS[-1])
    buffer = io.BytesIO()
    enhancement_grid(columns, titles, zoom).save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


__all__ = ["COLUMNS", "enhancement_grid", "enhancement_pictures"]

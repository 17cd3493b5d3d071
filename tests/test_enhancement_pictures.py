"""Enhancement picture grids (kdforge/report/enhancement_pictures.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.models.dense.enhancer import UNetEnhancer
from kdforge.report.enhancement_pictures import CAPTION, GUTTER, enhancement_grid, enhancement_pictures


def _tile(grid: np.ndarray, row: int, col: int, h: int, w: int, zoom: int) -> np.ndarray:
    x0 = GUTTER + col * (w * zoom + GUTTER)
    y0 = CAPTION + row * (h * zoom + CAPTION + GUTTER) + GUTTER
    return grid[y0 : y0 + h * zoom, x0 : x0 + w * zoom]


def test_grid_tiles_are_the_images_zoomed_by_nearest_neighbour() -> None:
    g = torch.Generator().manual_seed(0)
    cols = [torch.rand(2, 3, 5, 7, generator=g) for _ in range(3)]
    cols[1][0, 0, 0, 0] = 1.7  # clamped to white
    grid = np.asarray(enhancement_grid(cols, ("a", "b", "c"), zoom=3))
    assert grid.shape == (CAPTION + 2 * (15 + CAPTION + GUTTER) + GUTTER, 3 * (21 + GUTTER) + GUTTER, 3)
    for col in range(3):
        for row in range(2):
            want = cols[col][row].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            want = want.repeat(3, axis=0).repeat(3, axis=1)
            assert np.array_equal(_tile(grid, row, col, 5, 7, 3), want)
    with pytest.raises(ValueError, match="one title per column"):
        enhancement_grid(cols, ("a", "b"))
    with pytest.raises(ValueError, match="share one"):
        enhancement_grid([cols[0], cols[1][:1]], ("a", "b"))


def test_pictures_of_teacher_and_student(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student, teacher = UNetEnhancer(width=4).train(), UNetEnhancer(width=6)
    low, clean = torch.rand(3, 3, 8, 8) * 0.2, torch.rand(3, 3, 8, 8)
    path = enhancement_pictures(student, teacher, low, clean, tmp_path / "grid.png", zoom=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape[1] == 4 * (16 + GUTTER) + GUTTER and student.training  # four columns; mode restored
    with torch.no_grad():
        want = student.eval()(low)[1].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(_tile(grid, 1, 2, 8, 8, 2), want.repeat(2, axis=0).repeat(2, axis=1))
    alone = np.asarray(Image.open(enhancement_pictures(student, None, low, clean, tmp_path / "s.png", zoom=2)))
    assert alone.shape[1] == 3 * (16 + GUTTER) + GUTTER

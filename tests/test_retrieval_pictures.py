"""Retrieval pictures (query + top-k framed by relevance) and the precision–recall plot of the hashing report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kdforge.data.hashing import HashingLoader
from kdforge.ops.retrieval import evaluate_retrieval, precision_recall_by_radius
from kdforge.report.retrieval_pictures import (
    CAPTION,
    FRAME,
    GUTTER,
    IRRELEVANT,
    RELEVANT,
    plot_precision_recall,
    retrieval_grid,
    retrieval_pictures,
)


class _PixelCodes(nn.Module):
    """Codes = the sign of the first 8 normalised red pixels minus their mean: fixed, known, no parameters."""

    def forward(self, x):
        v = x[:, 0].flatten(1)[:, :8]
        return v - v.mean(1, keepdim=True)


def _split(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (n,), generator=g)
    return images, labels


def _cell_origin(row: int, col: int, h: int, w: int, captions: bool) -> tuple[int, int]:
    cell_w, cell_h = w + 2 * FRAME, h + 2 * FRAME + (CAPTION if captions else 0)
    x = GUTTER + col * (cell_w + GUTTER) + (GUTTER if col else 0)
    return x, GUTTER + row * (cell_h + GUTTER)


def test_grid_layout_frames_and_zoomed_pixels():
    q, _ = _split(2, 0)
    r, _ = _split(6, 1)
    rel = torch.tensor([[True, False, True], [False, False, True]])
    grid = retrieval_grid(q, r.view(2, 3, 3, 8, 8), rel, torch.zeros(2, 3, dtype=torch.int64), zoom=2)
    arr = np.asarray(grid)
    for row in range(2):
        x, y = _cell_origin(row, 0, 16, 16, True)
        want = np.repeat(np.repeat(q[row].permute(1, 2, 0).numpy(), 2, 0), 2, 1)
        assert np.array_equal(arr[y + FRAME : y + FRAME + 16, x + FRAME : x + FRAME + 16], want)
        for col in range(3):
            x, y = _cell_origin(row, col + 1, 16, 16, True)
            assert tuple(arr[y, x]) == (RELEVANT if rel[row, col] else IRRELEVANT)
            got = arr[y + FRAME : y + FRAME + 16, x + FRAME : x + FRAME + 16]
            assert np.array_equal(got, np.repeat(np.repeat(r[row * 3 + col].permute(1, 2, 0).numpy(), 2, 0), 2, 1))
    with pytest.raises(ValueError, match="uint8"):
        retrieval_grid(q.float(), r.view(2, 3, 3, 8, 8), rel)


def test_pictures_show_the_hamming_ranking_with_relevance_frames(tmp_path):
    qi, ql = _split(5, 2)
    di, dl = _split(30, 3)
    database = HashingLoader(di, dl, 7, train=False, image_size=8)
    queries = HashingLoader(qi, ql, 2, train=False, image_size=8, extra_splits={"database": database})
    path = retrieval_pictures(_PixelCodes(), queries, tmp_path / "r.png", num_queries=3, k=4, zoom=1)
    arr = np.asarray(Image.open(path).convert("RGB"))
    # brute force: numpy codes, stable sort on (distance, index)
    model = _PixelCodes()
    qc = np.where(model(torch.cat([b.input for b in queries])).numpy() >= 0, 1, -1)
    dc = np.where(model(torch.cat([b.input for b in database])).numpy() >= 0, 1, -1)
    for row in range(3):
        dist = (qc[row][None, :] != dc).sum(1)
        order = np.lexsort((np.arange(30), dist))[:4]
        for col, j in enumerate(order):
            x, y = _cell_origin(row, col + 1, 8, 8, True)
            assert tuple(arr[y, x]) == (RELEVANT if dl[j] == ql[row] else IRRELEVANT)
            assert np.array_equal(
                arr[y + FRAME : y + FRAME + 8, x + FRAME : x + FRAME + 8], di[j].permute(1, 2, 0).numpy()
            )
    with pytest.raises(ValueError, match="database"):
        retrieval_pictures(_PixelCodes(), database, tmp_path / "x.png")


def test_precision_recall_plot_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    q = torch.where(torch.rand(20, 8, generator=g) < 0.5, -1.0, 1.0)
    d = torch.where(torch.rand(50, 8, generator=g) < 0.5, -1.0, 1.0)
    res = evaluate_retrieval(q, d, torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (50,), generator=g))
    prec, rec = precision_recall_by_radius(res)
    prec[0] = float("nan")  # a radius at which no query retrieves anything: left out of the line, not a crash
    path = plot_precision_recall({"student": (prec, rec), "teacher": (prec.flip(0), rec)}, tmp_path / "pr.png")
    img = Image.open(path)
    assert img.format == "PNG" and img.size[0] > 100


def test_precision_recall_plot_scales_to_the_curves_and_wraps_a_long_title(tmp_path, monkeypatch):
    import kdforge.report.plots as plots

    seen = {}
    real_save = plots._save

    def spy(fig, path):
        ax = fig.axes[0]
        seen["ylim"], seen["title"] = ax.get_ylim(), ax.get_title()
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    prec = torch.tensor([float("nan"), 0.30, 0.20, 0.10])
    rec = torch.tensor([0.0, 0.1, 0.5, 1.0])
    title = "cifar10_hash: hash_resnet20 → hash_resnet8: Hamming-ball retrieval, last evaluation"
    plot_precision_recall({"student": (prec, rec)}, tmp_path / "pr.png", title=title)
    assert seen["ylim"] == pytest.approx((0.0, 0.33))  # near-chance precisions are not flattened on a 0..1 axis
    assert "\n" in seen["title"] and seen["title"].replace("\n", " ") == title
    plot_precision_recall({"student": (torch.full((4,), float("nan")), rec)}, tmp_path / "empty.png")
    assert seen["ylim"] == (0.0, 1.0)

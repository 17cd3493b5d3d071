"""Retrieval pictures of a hashing network: each query followed by its top-k database images, and the
precision–recall curve of Hamming-ball retrieval.

The grid is pure PIL: the images themselves at an integer zoom (nearest neighbour), one row per query, the query in
the first column, then its top ``k`` database images in Hamming-ranking order (ties by database index, the metric's
order, :func:`kdforge.ops.retrieval.rank_database`), each framed green when relevant to the query (same label, or a
shared label for multi-hot data) and red otherwise, with its Hamming distance in a caption strip.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from kdforge.data.hashing import HashingLoader
from kdforge.engine.checkpoint import atomic_write_bytes
from kdforge.models.dense.hashing import binary_codes
from kdforge.ops.retrieval import hamming_distance, rank_database, relevance

GUTTER = 4
FRAME = 2
CAPTION = 12
RELEVANT = (40, 170, 60)
IRRELEVANT = (200, 40, 40)


def retrieval_grid(
    queries: Tensor, retrieved: Tensor, relevant: Tensor, distances: Tensor | None = None, zoom: int = 3
) -> Image.Image:
    """One row per query: the query, then its retrieved images framed by relevance.

    Args:
        queries: ``[Q, 3, H, W]`` uint8.
        retrieved: ``[Q, k, 3, H, W]`` uint8, in ranking order.
        relevant: ``[Q, k]`` bool.
        distances: ``[Q, k]`` int Hamming distances written under each retrieved image (``None``: no captions).
        zoom: integer nearest-neighbour magnification.

    Returns:
        An RGB image.
    """
    if queries.dtype != torch.uint8 or retrieved.dtype != torch.uint8:
        raise ValueError("retrieval_grid draws uint8 images; pass the loader's raw images")
    q, k = retrieved.shape[:2]
    h, w = queries.shape[2] * zoom, queries.shape[3] * zoom
    cell_w, cell_h = w + 2 * FRAME, h + 2 * FRAME + (CAPTION if distances is not None else 0)
    canvas = Image.new("RGB", (GUTTER + (k + 1) * (cell_w + GUTTER) + GUTTER, GUTTER + q * (cell_h + GUTTER)), "white")
    draw = ImageDraw.Draw(canvas)

    def paste(img: Tensor, x: int, y: int) -> None:
        arr = img.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        canvas.paste(Image.fromarray(arr).resize((w, h), Image.NEAREST), (x + FRAME, y + FRAME))

    for r in range(q):
        y = GUTTER + r * (cell_h + GUTTER)
        paste(queries[r], GUTTER, y)
        for c in range(k):
            x = GUTTER + (c + 1) * (cell_w + GUTTER) + GUTTER
            color = RELEVANT if bool(relevant[r, c]) else IRRELEVANT
            draw.rectangle([x, y, x + cell_w - 1, y + h + 2 * FRAME - 1], fill=color)
            paste(retrieved[r, c], x, y)
            if distances is not None:
                draw.text((x + FRAME, y + h + 2 * FRAME), f"d={int(distances[r, c])}", fill=(0, 0, 0))
    return canvas


@torch.no_grad()
def _encode(model: nn.Module, loader: HashingLoader) -> tuple[Tensor, Tensor]:
    """Binary codes and dataset indices of every image of ``loader`` (one process)."""
    codes, index = [], []
    for batch in loader:
        codes.append(binary_codes(model(batch.input)).cpu())
        index.append(batch.index.cpu())
    order = torch.cat(index).argsort()
    return torch.cat(codes)[order], torch.cat(index)[order]


@torch.no_grad()
def retrieval_pictures(
    model: nn.Module, queries: HashingLoader, path: str | Path, num_queries: int = 8, k: int = 10, zoom: int = 3
) -> Path:
    """Encode the query split and its database, rank, and write the first ``num_queries`` queries with their top
    ``k`` database images as a PNG (atomically).

    Args:
        model: a hashing network (continuous codes ``[B, bits]``), run in eval mode on the loaders' device.
        queries: the query loader of a hashing dataset (its ``extra_splits["database"]`` is the database).
        path: the ``.png`` to write.
        num_queries: rows (the first queries of the split, in dataset order).
        k: retrieved images per query.
        zoom: see :func:`retrieval_grid`.

    Returns:
        ``path``.
    """
    database = queries.extra_splits.get("database")
    if database is None:
        raise ValueError("retrieval pictures need the query loader of a hashing dataset (extra_splits['database'])")
    was_training = model.training
    model.eval()
    try:
        q_codes, q_index = _encode(model, queries)
        d_codes, d_index = _encode(model, database)
    finally:
        model.train(was_training)
    q_codes, q_index = q_codes[:num_queries], q_index[:num_queries]
    dist = hamming_distance(q_codes, d_codes)
    order = rank_database(dist, k)  # [Q, k] positions in the database split
    rel = relevance(queries.labels[q_index].cpu(), database.labels.cpu()).gather(1, order)
    grid = retrieval_grid(
        queries.images[q_index].cpu(),
        database.images.cpu()[d_index[order]],
        rel,
        dist.gather(1, order),
        zoom,
    )
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_precision_recall(
    curves: Mapping[str, tuple[Tensor, Tensor]], path: str | Path, *, title: str = "Hamming-ball retrieval"
) -> Path:
    """Precision–recall curves of Hamming-ball retrieval, one line per method (PNG, atomically).

    Args:
        curves: label → ``(precision, recall)``, each ``[b + 1]`` (one point per Hamming radius ``0..b``), as
            :func:`kdforge.ops.retrieval.precision_recall_by_radius` returns them (NaN precision points, radii at
            which no query retrieves anything, are left out).
        path: the ``.png`` to write.
        title: plot title.

    Returns:
        ``path``.
    """
    from kdforge.report.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    highest = 0.0
    for label, (precision, recall) in curves.items():
        p, r = precision.double().cpu(), recall.double().cpu()
        keep = ~torch.isnan(p)
        ax.plot(r[keep].numpy(), p[keep].numpy(), marker="o", markersize=2.5, linewidth=1.4, label=label)
        if keep.any():
            highest = max(highest, float(p[keep].max()))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    # Unsupervised codes reach precisions near the 10 % chance level of CIFAR-10; a fixed 0..1 axis flattens the
    # methods' curves into one line.
    ax.set_ylim(0, min(1.0, 1.1 * highest) if highest > 0 else 1.0)
    # A sweep's group title names dataset and pair and would run past the figure's edge on one line.
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["plot_precision_recall", "retrieval_grid", "retrieval_pictures"]

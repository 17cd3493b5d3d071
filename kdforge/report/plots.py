"""PNG plots, rendered off-screen and written atomically."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from kdforge.engine.checkpoint import atomic_write_bytes


def plot_learning_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "",
    ylabel: str = "test top-1 (%)",
) -> Path:
    """One line per run of ``(epoch, value)`` points, saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        for label, points in curves.items():
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)

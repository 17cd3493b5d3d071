"""PNG plots, rendered off-screen and written atomically."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
        ax.legend(loc="best")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: object, path: str | Path) -> Path:
    plt = _pyplot()
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")  # type: ignore[attr-defined]
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_seed_curves(
    curves: Mapping[str, Sequence[Sequence[tuple[float, float]]]],
    path: str | Path,
    *,
    title: str = "",
    ylabel: str = "test top-1 (%)",
) -> Path:
    """Per label, the mean over seeds of ``(epoch, value)`` curves with a min–max band across seeds, as a PNG.

    Seeds are aligned on the epochs they all evaluated, so a band never mixes a finished seed with a shorter one.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    # The default cycle has 10 colours; a table with more methods would repeat them, so switch to 20.
    colors = plt.get_cmap("tab20").colors if len(curves) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, seeds) in enumerate(curves.items()):
        series = [dict(points) for points in seeds if points]
        if not series:
            continue
        epochs = sorted(set.intersection(*(set(s) for s in series)))
        if not epochs:
            continue
        values = [[s[e] for s in series] for e in epochs]
        mean = [sum(v) / len(v) for v in values]
        color = colors[i % len(colors)]
        ax.plot(epochs, mean, marker="o", markersize=3, linewidth=1.6, color=color, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            lo, hi = [min(v) for v in values], [max(v) for v in values]
            ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)  # a fixed corner hid the end of a curve that finishes low (a weak student)
    fig.tight_layout()
    return _save(fig, path)


def plot_gains(
    gains: Mapping[str, tuple[float, float]],
    path: str | Path,
    *,
    title: str = "",
    ylabel: str = "gain in best top-1 over the student alone (points)",
) -> Path:
    """A bar per label of ``(gain, error)``, error bars of ±error, as a PNG; negative gains point down."""
    plt = _pyplot()
    labels = list(gains)
    values = [gains[k][0] for k in labels]
    errors = [gains[k][1] for k in labels]
    # wide enough for a pair title such as "cifar10_lowlight: unet_enhancer_w32 → unet_enhancer_w8"
    fig, ax = plt.subplots(figsize=(max(6.5, 0.8 * len(labels) + 2), 4.2), dpi=110)
    colors = ["tab:blue" if v >= 0 else "tab:red" for v in values]
    ax.bar(range(len(labels)), values, yerr=errors, capsize=4, color=colors)
    ax.axhline(0.0, color="black", linewidth=0.8)
    # a row label that names its differing setting ("LD (method.temperature=10.0)") on two lines, not one long one
    ax.set_xticks(range(len(labels)), [textwrap.fill(k, 26) for k in labels], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)

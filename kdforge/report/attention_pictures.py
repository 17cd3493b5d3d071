"""Pictures of DATS's attention: what the student looked at and the two images it resampled from it.

One row per image: the input, its structure map (the trilinear attention summed over channels), the
structure-preserving resampled image the student classifies, a detail map (one attention channel) and the
detail-preserving resampled image the teacher learns from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kdforge.models.attention_sampled import AttentionSampledNet
from kdforge.report.plots import _pyplot, _save


@torch.no_grad()
def attention_rows(
    model: AttentionSampledNet, images: Tensor, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """The five panels of every image, each ``[N, ...]`` on the CPU.

    Args:
        model: an attention-sampled network (its ``glance`` steers the sampling).
        images: ``[N, 3, S, S]`` normalised inputs.
        generator: draws the detail channel (seeded for a reproducible picture).
    """
    model.eval()
    glance = model.glance(images)
    structure, detail = model.sampling_maps(glance, generator)
    return {
        "input": images.cpu(),
        "structure map": structure[:, 0].cpu(),
        "structure image": model.resample(images, structure).cpu(),
        "detail map": detail[:, 0].cpu(),
        "detail image": model.resample(images, detail).cpu(),
    }


def plot_attention(
    rows: dict[str, Tensor],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    path: str | Path,
    titles: list[str] | None = None,
) -> Path:
    """The panels of :func:`attention_rows` as a PNG grid (images un-normalised with ``mean``/``std``)."""
    plt = _pyplot()
    names = list(rows)
    n = rows[names[0]].shape[0]
    fig, axes = plt.subplots(n, len(names), figsize=(2.0 * len(names), 2.0 * n), dpi=110, squeeze=False)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for i in range(n):
        for j, name in enumerate(names):
            ax = axes[i][j]
            value = rows[name][i]
            if value.ndim == 3:  # an image: back to [0, 1] RGB
                ax.imshow((value * s + m).clamp(0, 1).permute(1, 2, 0).numpy())
            else:
                ax.imshow(value.numpy(), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0 and titles is not None:
                ax.set_ylabel(titles[i], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["attention_rows", "plot_attention"]

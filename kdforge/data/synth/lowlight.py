"""Synthetic low-light pairs from normal-light images (CIFAR-10 arrays or any image folder), no download.

Degradation of Lv, Li & Lu, "Attention Guided Low-light Image Enhancement with a Large Scale Low-light Simulation
Dataset" (arXiv 1908.00682, IJCV 2021): a linear scaling and a gamma curve on the image's pixel values,
``y = β·(α·x)^γ``, followed by sensor noise. Per image, independently:

- ``α ~ U(0.9, 1)``, ``β ~ U(0.5, 1)``, ``γ ~ U(1.5, 5)`` (the paper's ranges);
- Poisson–Gaussian noise (our ranges; the paper's exact noise parameters were not available to us): shot noise
  ``Poisson(y·P)/P`` with the photon count at white ``P`` log-uniform in [200, 2000], then read noise
  ``N(0, σ²)`` with ``σ ~ U(0.002, 0.01)`` (0.5–2.5 grey levels). At a typical darkened value y ≈ 0.06 this is
  a noise of 1.5–4.5 grey levels, visible after the ~×8 brightening an enhancer applies, as in LOL's low images;
- clip to [0, 1] and round to uint8 (real low-light images are 8-bit too, and the coarse quantization of the dark
  range is part of what the enhancer must undo).

The curve acts on the stored (sRGB-encoded) values, as the paper applies it to its sRGB source images, not in
linear light; the noise is therefore not physically exact but of the right signal-dependent form. Targets keep
their native size (CIFAR: 32×32; a folder: each image as it is, never resized).

Determinism: image ``i`` is degraded by a generator seeded with ``(seed, i)``, so its low-light version depends on
the seed and its index only — not on the number of images or the order of processing. The test split is always
degraded with the fixed :data:`TEST_SEED`, whatever the run's seed, so its PSNR/SSIM are comparable across runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdforge.data.lowlight import IMAGE_EXTENSIONS, InMemoryPairs, read_rgb
from kdforge.errors import DataError

#: The seed of every synthetic test split (fixed so numbers compare across runs and seeds).
TEST_SEED = 1908_00682

ALPHA_RANGE = (0.9, 1.0)
BETA_RANGE = (0.5, 1.0)
GAMMA_RANGE = (1.5, 5.0)
PHOTONS_RANGE = (200.0, 2000.0)  # log-uniform
READ_SIGMA_RANGE = (0.002, 0.01)


@dataclass(frozen=True)
class DegradeParams:
    """The parameters drawn for one image."""

    alpha: float
    beta: float
    gamma: float
    photons: float
    read_sigma: float


def degrade(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, DegradeParams]:
    """Darken and add noise to one normal-light image (see the module doc).

    Args:
        image: uint8 ``[3, H, W]``.
        rng: the image's own generator.

    Returns:
        The low-light uint8 ``[3, H, W]`` and the parameters drawn.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"source images must be uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
    alpha = rng.uniform(*ALPHA_RANGE)
    beta = rng.uniform(*BETA_RANGE)
    gamma = rng.uniform(*GAMMA_RANGE)
    photons = float(np.exp(rng.uniform(np.log(PHOTONS_RANGE[0]), np.log(PHOTONS_RANGE[1]))))
    sigma = rng.uniform(*READ_SIGMA_RANGE)
    x = image.astype(np.float64) / 255.0
    y = beta * (alpha * x) ** gamma
    y = rng.poisson(y * photons) / photons + rng.normal(0.0, sigma, size=y.shape)
    low = np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)
    return low, DegradeParams(float(alpha), float(beta), float(gamma), photons, float(sigma))


def synthesize(images: np.ndarray, seed: int) -> tuple[np.ndarray, list[DegradeParams]]:
    """Low-light versions of a stack of images, image ``i`` from a generator seeded with ``(seed, i)``.

    Args:
        images: uint8 ``[N, 3, H, W]`` (the layout of :class:`kdforge.data.cifar.ArrayData`).
        seed: the degradation seed.

    Returns:
        uint8 ``[N, 3, H, W]`` and the ``N`` parameter sets.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"source images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    lows = np.empty_like(images)
    params = []
    for i in range(len(images)):
        lows[i], p = degrade(images[i], np.random.default_rng([seed, i]))
        params.append(p)
    return lows, params


def lowlight_pairs_from_arrays(images: np.ndarray, seed: int, names: list[str] | None = None) -> InMemoryPairs:
    """A pair set: the images as targets, their :func:`synthesize` versions as inputs.

    Args:
        images: uint8 ``[N, 3, H, W]``, e.g. ``ArrayData.train_images`` of the embedded CIFAR-10 subset.
        seed: degradation seed (:data:`TEST_SEED` for a test split).
        names: pair names; default the indices.
    """
    lows, _ = synthesize(images, seed)
    return InMemoryPairs(
        torch.from_numpy(lows),
        torch.from_numpy(np.ascontiguousarray(images)),
        names or [str(i) for i in range(len(images))],
    )


def lowlight_splits_from_arrays(
    train_images: np.ndarray, test_images: np.ndarray, seed: int
) -> tuple[InMemoryPairs, InMemoryPairs]:
    """Training pairs degraded with the run's ``seed``; test pairs always with :data:`TEST_SEED`."""
    return lowlight_pairs_from_arrays(train_images, seed), lowlight_pairs_from_arrays(test_images, TEST_SEED)


def lowlight_pairs_from_folder(root: Path | str, seed: int) -> InMemoryPairs:
    """Pairs from a folder of normal-light images (any size, kept native), sorted by file name.

    Raises:
        DataError: the folder is missing, holds no images, or an image cannot be decoded.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} does not exist; point it at a folder of normal-light images")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    highs = [read_rgb(p) for p in paths]
    lows = [torch.from_numpy(degrade(h.numpy(), np.random.default_rng([seed, i]))[0]) for i, h in enumerate(highs)]
    return InMemoryPairs(lows, highs, [p.name for p in paths])

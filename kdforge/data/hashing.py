"""Image-retrieval (hashing) data: the CIFAR-10 protocols, NUS-WIDE/COCO-style list files, two-view augmentation.

Protocols return index arrays, never images, so they work on any labelled arrays (the official CIFAR archives, the
JPEG ``.npz``, the embedded 10k/2k subset): indices point into the *pool* = the training arrays followed by the test
arrays (pool index ``i < N_train`` is training image ``i``, else test image ``i − N_train``; :func:`pool_arrays`).
Every draw comes from ``numpy.random.default_rng(seed)``, so a split is a function of (labels, seed).

The two-view augmentation is CIBHash's SimCLR-style pipeline (zexuanqiu/CIBHash ``utils/data.py``, reused by
hly1998/BRCD): random resized crop (scale 0.5–1), horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
probability 0.7, grayscale with probability 0.2, 3×3 Gaussian blur (σ ∈ [0.1, 2]) with probability 0.5, written as
batched tensor ops on the training device (docs/tasks/hashing.md lists the differences from torchvision's PIL ops).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kdforge.data import DataBundle, DataRequest, balanced_subset, cifar10_source
from kdforge.data.augment import IMAGENET_MEAN, IMAGENET_STD, hflip_where
from kdforge.data.batch import Batch
from kdforge.data.loader import train_shard
from kdforge.errors import DataError
from kdforge.registry import DATASETS
from kdforge.seeding import mix_seed

#: mAP@k of the BRCD/CIBHash protocols
CIFAR10_TOPK = 1000
MULTILABEL_TOPK = 5000


@dataclass(frozen=True)
class HashingSplit:
    """Index arrays (int64, into the pool of :func:`pool_arrays`) of one retrieval protocol.

    Attributes:
        train: images the hasher trains on.
        val: validation queries (model selection); empty when the protocol has none.
        query: test queries.
        database: the retrieval set.
        topk: the ``k`` of the protocol's mAP@k; ``None`` = mAP over the whole database.
    """

    train: np.ndarray
    val: np.ndarray
    query: np.ndarray
    database: np.ndarray
    topk: int | None


def pool_arrays(
    train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The pool the protocols index: training arrays followed by test arrays (``[N_train + N_test, ...]`` each)."""
    return np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])


def _per_class(labels: np.ndarray, count: int, rng: np.random.Generator, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random indices of every class (classes in ascending order) and the remaining indices (sorted)."""
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < count:
            raise DataError(
                f"class {c} has {idx.size} images but the protocol draws {count} per class for {what}; "
                "use the full dataset or a smaller per-class count"
            )
        picked.append(idx[rng.permutation(idx.size)[:count]])
    chosen = np.concatenate(picked).astype(np.int64)
    rest = np.setdiff1d(np.arange(labels.size), chosen).astype(np.int64)
    return chosen, rest


def brcd_cifar_split(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    seed: int = 0,
    train_per_class: int = 500,
    num_val: int | None = None,
) -> HashingSplit:
    """BRCD's and CIBHash's CIFAR-10 protocol (hly1998/BRCD and zexuanqiu/CIBHash ``utils/data.py`` ``get_cifar``).

    Train on ``train_per_class`` random training images of every class (5,000); shuffle the test set and split it in
    half: the first half validates, the second half are the queries (5,000 / 5,000); the database is the whole
    training set (50,000, training images included). mAP@1000.

    Args:
        train_labels: ``[N_train]`` int labels.
        test_labels: ``[N_test]`` int labels.
        seed: the draw.
        train_per_class: 500 in the reference.
        num_val: validation queries, default half of the test set (5,000 of 10,000).

    Returns:
        A :class:`HashingSplit` (pool indices).
    """
    rng = np.random.default_rng(seed)
    n_train, n_test = len(train_labels), len(test_labels)
    train, _ = _per_class(np.asarray(train_labels), train_per_class, rng, "training")
    perm = rng.permutation(n_test).astype(np.int64) + n_train
    nv = n_test // 2 if num_val is None else num_val
    if not 0 <= nv <= n_test:
        raise DataError(f"num_val={nv} must lie in [0, {n_test}] (the number of test images)")
    return HashingSplit(
        train=train, val=perm[:nv], query=perm[nv:], database=np.arange(n_train, dtype=np.int64), topk=CIFAR10_TOPK
    )


def supervised_cifar_split(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    seed: int = 0,
    query_per_class: int = 100,
    train_per_class: int = 500,
    database_includes_train: bool = True,
) -> HashingSplit:
    """The supervised-hashing CIFAR-10 protocol of DPSH (Li et al., IJCAI 2016) and HashNet-era code.

    Pool the 60,000 training and test images; per class draw ``query_per_class`` queries (1,000) and, from the rest,
    ``train_per_class`` training images (5,000). The database is every non-query image (59,000, training images
    included: DPSH's definition and DeepHash-pytorch's ``cifar10-1``); ``database_includes_train=False`` gives the
    54,000-image variant (DeepHash-pytorch's ``cifar10``). mAP over the whole database.

    Args:
        train_labels: ``[N_train]`` int labels.
        test_labels: ``[N_test]`` int labels.
        seed: the draw.
        query_per_class: 100.
        train_per_class: 500.
        database_includes_train: see above.

    Returns:
        A :class:`HashingSplit` (pool indices; ``val`` empty).
    """
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.asarray(train_labels), np.asarray(test_labels)])
    query, rest = _per_class(labels, query_per_class, rng, "queries")
    sub, _ = _per_class(labels[rest], train_per_class, rng, "training")
    train = rest[sub]
    database = rest if database_includes_train else np.setdiff1d(rest, train).astype(np.int64)
    return HashingSplit(train=train, val=np.zeros(0, np.int64), query=query, database=database, topk=None)


# ----------------------------------------------------------------------------------------------------------------
# NUS-WIDE / MS-COCO list files


@dataclass(frozen=True)
class ImageList:
    """A list file: image paths and their multi-hot labels (``[N, K]`` float32 0/1)."""

    paths: list[str]
    labels: np.ndarray


def read_image_list(path: str | Path, num_classes: int | None = None) -> ImageList:
    """Reads a NUS-WIDE/COCO-style list file: each line ``<image path> <l_1> … <l_K>`` with 0/1 label columns.

    This is the ``train.txt``/``test.txt``/``database.txt`` format of the DeepHash/HashNet releases read by
    hly1998/BRCD ``get_coco`` (paths are taken as written; relevance between two images = they share a label).

    Args:
        path: the list file.
        num_classes: expected K (NUS-WIDE 21, COCO 80); ``None`` takes the first line's count.

    Raises:
        DataError: missing or empty file, a line without labels, a label that is not 0 or 1, a line with a
            different number of labels.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} does not exist; pass a list file with lines '<image path> <0/1 label columns>'")
    paths: list[str] = []
    rows: list[list[float]] = []
    k = num_classes
    with p.open("r", encoding="utf-8-sig", errors="replace") as fh:  # -sig: a BOM is not part of a path
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{p}:{lineno}: no label columns after '{parts[0]}'; expected '<path> <0/1 ...>'")
            cols = parts[1:]
            if k is None:
                k = len(cols)
            if len(cols) != k:
                raise DataError(f"{p}:{lineno}: {len(cols)} label columns, expected {k}; every line needs K 0/1 labels")
            try:
                vals = [float(c) for c in cols]
            except ValueError:
                raise DataError(f"{p}:{lineno}: a label column is not a number; labels must be 0 or 1") from None
            if any(v not in (0.0, 1.0) for v in vals):
                raise DataError(f"{p}:{lineno}: labels must be 0 or 1 (multi-hot), found {cols}")
            paths.append(parts[0])
            rows.append(vals)
    if not paths:
        raise DataError(f"{p} has no entries; expected lines '<image path> <0/1 label columns>'")
    return ImageList(paths, np.asarray(rows, dtype=np.float32))


def read_list_protocol(root: str | Path, num_classes: int | None = None) -> dict[str, ImageList]:
    """The three lists of a NUS-WIDE/COCO hashing release in ``root``: ``train.txt``, ``test.txt`` (the queries) and
    ``database.txt``, all with the same K. mAP@5,000 (:data:`MULTILABEL_TOPK`)."""
    r = Path(root)
    out = {name: read_image_list(r / f"{name}.txt", num_classes) for name in ("train", "test", "database")}
    ks = {name: lst.labels.shape[1] for name, lst in out.items()}
    if len(set(ks.values())) != 1:
        raise DataError(f"{r}: the list files disagree on the number of labels {ks}; they must share one label set")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Two-view augmentation (batched, on the device)


def random_resized_crop(
    x: Tensor,
    size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample random crop of area ``scale`` × image and aspect ``ratio`` (log-uniform), resized to ``size``.

    One draw per sample instead of torchvision's ten rejection attempts: the aspect ratio is drawn first and the area
    is clipped so the crop fits (the distribution differs from torchvision's at extreme ratios). Bilinear resampling
    through ``grid_sample``.

    Args:
        x: ``[B, C, H, W]`` float.
        size: output side.
        scale: area fraction range.
        ratio: aspect ratio range (w/h).
        generator: randomness on ``x``'s device.

    Returns:
        ``[B, C, size, size]``.
    """
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(scale[0], scale[1], generator=generator) * (h * w)
    logr = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(logr)
    cw = torch.sqrt(area * r).clamp(max=w)
    ch = torch.sqrt(area / r).clamp(max=h)
    x0 = torch.rand(b, device=dev, generator=generator) * (w - cw)
    y0 = torch.rand(b, device=dev, generator=generator) * (h - ch)
    # affine map from the output grid in [-1, 1] to the crop window in input normalised coordinates
    sx, sy = cw / w, ch / h
    tx = (2 * x0 + cw) / w - 1
    ty = (2 * y0 + ch) / h - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    dc = delta.clamp(min=1e-12)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, s, v], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (rr, gg, bb) in enumerate(choices):
        sel = (i == k)[:, None]
        out = torch.where(sel, torch.stack([rr, gg, bb], 1), out)
    return out


def color_jitter(
    x: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.7,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision ``RandomApply([ColorJitter(b, c, s, h)], p)`` on floats in [0, 1], per sample.

    Factors as torchvision: brightness, contrast, saturation ~ U(1 − v, 1 + v), hue shift ~ U(−h, h). The four
    operations run in a fixed order (brightness, contrast, saturation, hue) rather than torchvision's random order.

    Args:
        x: ``[B, 3, H, W]`` float in [0, 1].
        brightness, contrast, saturation, hue: jitter strengths.
        p: probability that a sample is jittered at all.
        generator: randomness on ``x``'s device.

    Returns:
        ``[B, 3, H, W]`` in [0, 1].
    """
    b, dev = x.shape[0], x.device

    def factor(v: float) -> Tensor:
        return torch.empty(b, 1, 1, 1, device=dev).uniform_(1 - v, 1 + v, generator=generator)

    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    dh = torch.empty(b, 1, 1, device=dev).uniform_(-hue, hue, generator=generator)
    apply = (torch.rand(b, device=dev, generator=generator) < p)[:, None, None, None]
    y = (x * fb).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = (mean + fc * (y - mean)).clamp(0, 1)
    y = (_gray(y) + fs * (y - _gray(y))).clamp(0, 1)
    hsv = _rgb_to_hsv(y)
    hsv = torch.stack([(hsv[:, 0] + dh) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    y = _hsv_to_rgb(hsv).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """Replace a sample by its luma (ITU-R 601) in all three channels with probability ``p``. ``[B, 3, H, W]``."""
    pick = (torch.rand(x.shape[0], device=x.device, generator=generator) < p)[:, None, None, None]
    return torch.where(pick, _gray(x), x)


def random_gaussian_blur(
    x: Tensor,
    kernel_size: int = 3,
    sigma: tuple[float, float] = (0.1, 2.0),
    p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CIBHash's ``GaussianBlur(3)``: with probability ``p`` a ``k×k`` Gaussian blur, σ ~ U(0.1, 2), per sample.

    Separable, reflect-padded (OpenCV's default border is reflect-101, which ``F.pad(mode="reflect")`` is).
    """
    b, c, h, w = x.shape
    dev = x.device
    s = torch.empty(b, device=dev).uniform_(sigma[0], sigma[1], generator=generator)
    pick = (torch.rand(b, device=dev, generator=generator) < p)[:, None, None, None]
    r = kernel_size // 2
    offs = torch.arange(-r, r + 1, device=dev, dtype=x.dtype)
    k1 = torch.exp(-(offs[None, :] ** 2) / (2 * s[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # [B, k]
    xp = F.pad(x, (r, r, r, r), mode="reflect")
    # per-sample kernels through grouped convolutions: fold the batch into channels
    kx = k1[:, None, None, :].repeat_interleave(c, 0)  # [B*C, 1, 1, k]
    ky = k1[:, None, :, None].repeat_interleave(c, 0)  # [B*C, 1, k, 1]
    y = F.conv2d(xp.reshape(1, b * c, h + 2 * r, w + 2 * r), kx, groups=b * c)
    y = F.conv2d(y, ky, groups=b * c).reshape(b, c, h, w)
    return torch.where(pick, y, x)


def hashing_view(
    images: Tensor,
    size: int,
    generator: torch.Generator | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Tensor:
    """One CIBHash training view of a uint8 batch ``[B, 3, H, W]`` → normalized float32 ``[B, 3, size, size]``.

    Random resized crop (scale 0.5–1) → flip (p 0.5) → colour jitter (p 0.7) → grayscale (p 0.2) → Gaussian blur
    (p 0.5) → normalize (ImageNet statistics, as the reference).
    """
    x = images.to(torch.float32) / 255.0
    x = random_resized_crop(x, size, generator=generator)
    x = hflip_where(x, torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5)
    x = color_jitter(x, generator=generator)
    x = random_grayscale(x, generator=generator)
    x = random_gaussian_blur(x, generator=generator)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def two_views(
    images: Tensor,
    size: int,
    generator: torch.Generator | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> tuple[Tensor, Tensor]:
    """Two independent :func:`hashing_view` s of the same uint8 batch (the reference draws both views per image)."""
    return hashing_view(images, size, generator, mean, std), hashing_view(images, size, generator, mean, std)


def eval_view(
    images: Tensor, size: int, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> Tensor:
    """The reference's CIFAR-10 test transform: resize to ``size × size`` (bilinear), normalize. uint8 → float32."""
    x = images.to(torch.float32) / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------------------------------------------
# Loaders and registered datasets


class HashingLoader:
    """Batches of an in-memory retrieval split held on the device.

    Training batches (``train=True``) carry the two CIBHash views of each image stacked on the channel axis,
    ``input [B, 6, S, S]`` (:func:`two_views`, drawn from ``(seed, epoch, rank, batch)`` alone, so a resumed epoch
    redraws them; without ``augment`` both views are the plain :func:`eval_view`); an epoch is a seeded permutation
    sharded over ranks like every other loader (:func:`~kdforge.data.loader.train_shard`). Evaluation batches
    carry one :func:`eval_view` per image, every image once, rank ``r`` taking images ``r, r + W, ...``.
    ``Batch.index`` is the image's position in this split (the ranking's tie order and BRCD's cluster lookup),
    ``Batch.targets`` its labels (``[B]`` int64 or ``[B, K]`` multi-hot), ``Batch.target`` the single labels (zeros
    for multi-hot data).

    Args:
        images: ``[N, 3, H, W]`` uint8.
        labels: ``[N]`` int64 or ``[N, K]`` float32 multi-hot.
        batch_size: images per batch (per rank).
        train: two augmented views, shuffled, last partial global batch dropped; else one plain view, in order.
        image_size: side ``S`` of the network input.
        device: where the images live and batches are made.
        seed, rank, world_size, augment: as the other loaders.
        extra_splits: further splits an evaluator scores this one against (the queries' ``{"database": loader}``,
            :attr:`kdforge.tasks.base.Evaluator.extra_splits`).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        image_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        extra_splits: Mapping[str, HashingLoader] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.image_size = batch_size, train, image_size
        self.seed, self.rank, self.world_size, self.augment = seed, rank, world_size, augment
        self.extra_splits: dict[str, HashingLoader] = dict(extra_splits or {})
        self.num_samples = self.dataset_size = images.shape[0]
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // (self.world_size * self.batch_size)
        return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)

    def _order(self) -> list[Tensor]:
        if self.train:
            shard = train_shard(
                self.num_samples, self.batch_size, seed=self.seed, epoch=self.epoch, rank=self.rank,
                world_size=self.world_size,
            )  # fmt: skip
            return list(shard.view(-1, self.batch_size))
        return list(torch.split(torch.arange(self.rank, self.num_samples, self.world_size), self.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        for i in range(self.start_batch, len(order)):
            idx = order[i].to(self.device)
            images, labels = self.images[idx], self.labels[idx]
            if self.train and self.augment:
                g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.rank, i, 19))
                x = torch.cat(two_views(images, self.image_size, g), dim=1)
            elif self.train:
                view = eval_view(images, self.image_size)
                x = torch.cat([view, view], dim=1)
            else:
                x = eval_view(images, self.image_size)
            single = labels if labels.ndim == 1 else torch.zeros(len(idx), dtype=torch.int64, device=self.device)
            yield Batch(x, single, idx, targets=labels)
        self.start_batch = 0


def _uint8_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))


def _bundle(
    pool_images: np.ndarray,
    pool_labels: np.ndarray,
    split: HashingSplit,
    classes: list[str],
    *,
    batch_size: int,
    eval_batch_size: int,
    image_size: int,
    augment: bool,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
) -> DataBundle:
    """The DataBundle of a protocol: ``train`` = two-view training batches, ``test`` = the queries, carrying the
    database as ``test.extra_splits["database"]``."""

    def part(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        labels = torch.from_numpy(np.asarray(pool_labels[idx]))
        return _uint8_tensor(pool_images[idx]), labels.long() if labels.ndim == 1 else labels.float()

    common: dict[str, Any] = {"image_size": image_size, "device": device, "rank": rank, "world_size": world_size}
    database = HashingLoader(*part(split.database), eval_batch_size, train=False, **common)
    queries = HashingLoader(
        *part(split.query), eval_batch_size, train=False, extra_splits={"database": database}, **common
    )
    train_images, train_labels = part(split.train)
    train = HashingLoader(train_images, train_labels, batch_size, train=True, seed=seed, augment=augment, **common)
    return DataBundle(
        train, queries, len(classes), classes, image_size, IMAGENET_MEAN, IMAGENET_STD, len(split.train),
        train_targets=train_labels.cpu() if train_labels.ndim == 1 else None,
    )  # fmt: skip


def _cifar_pool(root: str | None, download: bool, train_subset: int | None) -> tuple[Any, np.ndarray, np.ndarray]:
    """The CIFAR-10 source (embedded subset without ``root``) with its training split cut to a balanced
    ``train_subset`` (fixed seed 0): the pool arrays are that training split followed by the test split."""
    src = cifar10_source(root, download)
    keep = balanced_subset(np.asarray(src.train_labels), train_subset, seed=0)
    return src, np.asarray(src.train_labels)[keep], keep


@DATASETS.register(
    "cifar10_hash", kind="task", task="hashing", num_classes=10, image_size=32,
    description="retrieval, BRCD's protocol: 500 train imgs/class, test split 1/2 val + 1/2 queries, db = train set",
    split="protocol (a): 500 training images per class, half the test set as queries, the training set as database",
)  # fmt: skip
def _cifar10_hash(req: DataRequest) -> DataBundle:
    """Protocol (a), :func:`brcd_cifar_split` (dataset seed 0, the same for every run): the hasher trains on 500
    training images per class, the queries are half of the test set, the database is the whole training set,
    mAP@1000 (``task.topk``), on the CIFAR-10 of ``data.root`` (the JPEG ``.npz`` or the archive folder; default:
    the embedded 10k/2k subset). ``data.train_subset`` cuts the training set (= the database) to a balanced subset,
    from which the protocol still draws up to 500 images per class; ``data.test_subset`` keeps that many queries
    (balanced). The validation half of the test set is not used (the loop keeps the best epoch by the queries' mAP)."""
    src, train_labels, keep = _cifar_pool(req.root, req.download, req.train_subset)
    test_labels = np.asarray(src.test_labels)
    per_class = int(min(500, np.bincount(train_labels).min()))
    split = brcd_cifar_split(train_labels, test_labels, seed=0, train_per_class=per_class)
    query = split.query[balanced_subset(np.concatenate([train_labels, test_labels])[split.query], req.test_subset)]
    split = HashingSplit(split.train, split.val, np.sort(query), split.database, split.topk)
    images, labels = pool_arrays(np.asarray(src.train_images)[keep], train_labels, src.test_images, test_labels)
    return _bundle(
        images, labels, split, list(src.classes), batch_size=req.batch_size, eval_batch_size=req.eval_batch_size,
        image_size=req.image_size or 32, augment=req.augment, seed=req.seed, **req.shard(),
    )  # fmt: skip


@DATASETS.register(
    "cifar10_hash_sup", kind="task", task="hashing", num_classes=10, image_size=32,
    description="retrieval, supervised-hashing protocol: 100 queries/class, 500 train imgs/class, db = the rest",
    split="protocol (b): 500 training images and 100 test-set queries per class, every other image as database",
)  # fmt: skip
def _cifar10_hash_sup(req: DataRequest) -> DataBundle:
    """Protocol (b), :func:`supervised_cifar_split` (dataset seed 0): training and test images pooled, 100 queries
    and 500 training images per class, every non-query image in the database; set ``task.topk: null`` for its
    mAP@all. ``data.train_subset`` / ``data.test_subset`` set the training-image and query counts (split evenly
    over the classes; defaults 5,000 / 1,000)."""
    src = cifar10_source(req.root, req.download)
    train_labels, test_labels = np.asarray(src.train_labels), np.asarray(src.test_labels)
    k = len(src.classes)
    split = supervised_cifar_split(
        train_labels, test_labels, seed=0, query_per_class=(req.test_subset or 100 * k) // k,
        train_per_class=(req.train_subset or 500 * k) // k,
    )  # fmt: skip
    images, labels = pool_arrays(src.train_images, train_labels, src.test_images, test_labels)
    return _bundle(
        images, labels, split, list(src.classes), batch_size=req.batch_size, eval_batch_size=req.eval_batch_size,
        image_size=req.image_size or 32, augment=req.augment, seed=req.seed, **req.shard(),
    )  # fmt: skip


def _read_list_images(lst: ImageList, root: Path, size: int) -> np.ndarray:
    """The images of a list file, decoded to RGB and resized to ``size × size`` (bilinear): ``[N, 3, S, S]`` uint8.
    Relative paths are read from ``root``."""
    out = np.empty((len(lst.paths), 3, size, size), dtype=np.uint8)
    for i, rel in enumerate(lst.paths):
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        try:
            with Image.open(path) as im:
                img = im.convert("RGB").resize((size, size), Image.BILINEAR)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read the image listed in the list file ({err})") from None
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out


@DATASETS.register(
    "hash_list", kind="task", task="hashing", num_classes=None, image_size=224,
    description="your retrieval data: train.txt, test.txt (queries), database.txt in data.root (path + 0/1 labels)",
)  # fmt: skip
def _hash_list(req: DataRequest) -> DataBundle:
    """NUS-WIDE/MS-COCO-style list files (:func:`read_list_protocol`; relative image paths are read from
    ``data.root``), decoded into memory at ``data.image_size`` (default 224); relevant = shares a label; use
    ``task.topk: 5000`` (the multi-label protocols' mAP@5,000). ``data.train_subset`` / ``data.test_subset`` keep
    the first that many training images / queries."""
    if req.root is None:
        raise DataError("dataset 'hash_list' needs data.root: a folder with train.txt, test.txt and database.txt")
    r = Path(req.root)
    lists = read_list_protocol(r)
    size = req.image_size or 224
    cut = {"train": req.train_subset, "test": req.test_subset, "database": None}
    arrays = {}
    for name, lst in lists.items():
        n = len(lst.paths) if cut[name] is None else min(cut[name], len(lst.paths))  # type: ignore[type-var]
        lst = ImageList(lst.paths[:n], lst.labels[:n])
        arrays[name] = (_read_list_images(lst, r, size), lst.labels)
    sizes = {name: len(a[0]) for name, a in arrays.items()}
    offsets = np.cumsum([0, sizes["train"], sizes["test"]])
    images = np.concatenate([arrays[n][0] for n in ("train", "test", "database")])
    labels = np.concatenate([arrays[n][1] for n in ("train", "test", "database")])
    split = HashingSplit(
        train=np.arange(offsets[0], offsets[1]), val=np.zeros(0, np.int64), query=np.arange(offsets[1], offsets[2]),
        database=np.arange(offsets[2], offsets[2] + sizes["database"]), topk=MULTILABEL_TOPK,
    )  # fmt: skip
    k = labels.shape[1]
    return _bundle(
        images, labels, split, [f"label{i}" for i in range(k)], batch_size=req.batch_size,
        eval_batch_size=req.eval_batch_size, image_size=size, augment=req.augment, seed=req.seed, **req.shard(),
    )  # fmt: skip


__all__ = [
    "CIFAR10_TOPK",
    "MULTILABEL_TOPK",
    "HashingLoader",
    "HashingSplit",
    "ImageList",
    "brcd_cifar_split",
    "color_jitter",
    "eval_view",
    "hashing_view",
    "pool_arrays",
    "random_gaussian_blur",
    "random_grayscale",
    "random_resized_crop",
    "read_image_list",
    "read_list_protocol",
    "supervised_cifar_split",
    "two_views",
]

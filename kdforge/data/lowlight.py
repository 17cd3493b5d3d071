"""Paired low-/normal-light images: the LOL folder layout, in-memory pair sets, and a batch loader.

Layout of LOL (Wei et al., "Deep Retinex Decomposition for Low-Light Enhancement", BMVC 2018) and of the many
datasets distributed the same way::

    root/our485/low/*.png   root/our485/high/*.png     (training, 485 pairs)
    root/eval15/low/*.png   root/eval15/high/*.png     (evaluation, 15 pairs)

A low image and its normal-light target have the same file name. Every pair is checked when the folder is scanned
(names and image sizes, from the file headers): an unpaired file or a size mismatch is one :class:`DataError`
naming the file.

:class:`PairLoader` yields ``(low, high)`` float batches in [0, 1] on the training device: for training, a seeded
per-epoch permutation, one random ``crop_size`` square per image (cut on the host because images may differ in
size) and joint flips of input and target drawn per sample and applied on the device; for evaluation, whole images
in order (consecutive images of one size are batched together).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kdforge.data import DataBundle, DataRequest, cifar10_source
from kdforge.data.batch import Batch
from kdforge.data.loader import mix_seed, train_shard
from kdforge.errors import DataError
from kdforge.registry import DATASETS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: LOL's split folders.
LOL_SPLITS = {"train": "our485", "eval": "eval15"}


def read_rgb(path: Path) -> Tensor:
    """Decode an image file to uint8 ``[3, H, W]`` RGB (grey and palette images are converted).

    Raises:
        DataError: the file cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}; replace or remove the file") from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}; replace or remove the file") from err
    return h, w


def _list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; a paired dataset needs <split>/low/ and <split>/high/ folders")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def scan_pairs(low_dir: Path | str, high_dir: Path | str) -> list[tuple[Path, Path]]:
    """``[(low_path, high_path)]`` matched by file name, sorted by name, sizes checked.

    Raises:
        DataError: a folder is missing or empty, a file has no partner of the same name, or the two images of a pair
            differ in size (one line naming the file).
    """
    low_dir, high_dir = Path(low_dir), Path(high_dir)
    lows, highs = _list_images(low_dir), _list_images(high_dir)
    for name in lows:
        if name not in highs:
            raise DataError(
                f"{low_dir / name} has no normal-light partner {high_dir / name}; add it or remove the file"
            )
    for name in highs:
        if name not in lows:
            raise DataError(f"{high_dir / name} has no low-light partner {low_dir / name}; add it or remove the file")
    if not lows:
        raise DataError(f"{low_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    pairs = []
    for name in sorted(lows):
        sl, sh = _image_size(lows[name]), _image_size(highs[name])
        if sl != sh:
            raise DataError(
                f"{lows[name]} is {sl[0]}×{sl[1]} but its target {highs[name]} is {sh[0]}×{sh[1]}; "
                "a pair must have one size"
            )
        pairs.append((lows[name], highs[name]))
    return pairs


class PairSet(abc.ABC):
    """Low/normal-light image pairs, indexable: ``pair(i)`` → ``(low, high)`` uint8 ``[3, H, W]`` tensors.

    Subclasses hold the images in memory (:class:`InMemoryPairs`) or read them from disk (:class:`PairedFolder`).
    """

    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    @abc.abstractmethod
    def pair(self, i: int) -> tuple[Tensor, Tensor]:
        """Pair ``i`` as uint8 ``[3, H, W]`` tensors ``(low, high)``."""

    @abc.abstractmethod
    def size(self, i: int) -> tuple[int, int]:
        """``(H, W)`` of pair ``i``."""


class InMemoryPairs(PairSet):
    """Pairs held as uint8 tensors: one ``[N, 3, H, W]`` stack each, or lists of ``[3, H_i, W_i]`` images.

    Args:
        lows, highs: the low-light inputs and their targets, index-aligned.
        names: a name per pair (file names, or the source index), used in error messages.
    """

    def __init__(self, lows: Tensor | Sequence[Tensor], highs: Tensor | Sequence[Tensor], names: Sequence[str]) -> None:
        if not (len(lows) == len(highs) == len(names)):
            raise DataError(f"{len(lows)} low images, {len(highs)} targets and {len(names)} names: they must match")
        for i in range(len(lows)):
            if lows[i].shape != highs[i].shape or lows[i].dtype != torch.uint8 or lows[i].dim() != 3:
                raise DataError(
                    f"pair {names[i]}: low {tuple(lows[i].shape)} {lows[i].dtype} vs target {tuple(highs[i].shape)}; "
                    "pairs must be uint8 [3, H, W] of one size"
                )
        self.lows, self.highs, self.names = lows, highs, list(names)

    def pair(self, i: int) -> tuple[Tensor, Tensor]:
        return self.lows[i], self.highs[i]

    def size(self, i: int) -> tuple[int, int]:
        return int(self.lows[i].shape[-2]), int(self.lows[i].shape[-1])


class PairedFolder(PairSet):
    """Pairs read from ``low_dir``/``high_dir`` by matching file names (decoded on access, nothing cached).

    Args:
        low_dir, high_dir: the two folders (see :func:`scan_pairs` for the checks).
    """

    def __init__(self, low_dir: Path | str, high_dir: Path | str) -> None:
        self.paths = scan_pairs(low_dir, high_dir)
        self.names = [low.name for low, _ in self.paths]
        self._sizes = [_image_size(low) for low, _ in self.paths]

    def pair(self, i: int) -> tuple[Tensor, Tensor]:
        low, high = self.paths[i]
        return read_rgb(low), read_rgb(high)

    def size(self, i: int) -> tuple[int, int]:
        return self._sizes[i]


def lol_split(root: Path | str, split: str) -> PairedFolder:
    """The ``"train"`` (``our485``) or ``"eval"`` (``eval15``) split of a LOL-layout folder."""
    if split not in LOL_SPLITS:
        raise DataError(f"unknown LOL split {split!r}; use one of {sorted(LOL_SPLITS)}")
    base = Path(root) / LOL_SPLITS[split]
    if not base.is_dir():
        raise DataError(f"{base} does not exist; a LOL-layout root holds our485/{{low,high}} and eval15/{{low,high}}")
    return PairedFolder(base / "low", base / "high")


# ------------------------------------------------------------------------------------------------ augmentation


def joint_flip(low: Tensor, high: Tensor, hflip: Tensor, vflip: Tensor) -> tuple[Tensor, Tensor]:
    """Flip input and target together: left-right where ``hflip`` ``[B]`` is set, up-down where ``vflip`` is.

    Args:
        low, high: ``[B, C, H, W]``.
        hflip, vflip: ``[B]`` bool on the same device.

    Returns:
        The flipped ``(low, high)``.
    """
    h = hflip[:, None, None, None]
    v = vflip[:, None, None, None]
    low = torch.where(h, low.flip(3), low)
    high = torch.where(h, high.flip(3), high)
    return torch.where(v, low.flip(2), low), torch.where(v, high.flip(2), high)


def joint_crop(low: Tensor, high: Tensor, top: Tensor, left: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Cut the same ``size × size`` window out of input and target, per sample, in one gather.

    Args:
        low, high: ``[B, C, H, W]``.
        top, left: ``[B]`` int64 offsets, ``0 ≤ top ≤ H − size``, ``0 ≤ left ≤ W − size``.
        size: crop side.

    Returns:
        ``[B, C, size, size]`` each.
    """
    b = low.shape[0]
    ar = torch.arange(size, device=low.device)
    rows = (top.to(low.device)[:, None] + ar)[:, :, None]  # [B, S, 1]
    cols = (left.to(low.device)[:, None] + ar)[:, None, :]  # [B, 1, S]
    idx = torch.arange(b, device=low.device)[:, None, None]
    both = torch.cat([low, high], dim=1).permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)
    return both.split(low.shape[1], dim=1)


def random_joint_augment(
    low: Tensor, high: Tensor, generator: torch.Generator, crop_size: int | None = None, flips: bool = True
) -> tuple[Tensor, Tensor]:
    """Random joint crop (when ``crop_size`` is given) and random horizontal/vertical flips of a same-size batch.

    The randomness is drawn on the host from ``generator`` (a CPU generator), so a seed gives the same batch on
    every device; the image operations run on the images' device.

    Args:
        low, high: ``[B, C, H, W]``.
        generator: CPU ``torch.Generator``.
        crop_size: side of the random square crop, ``≤ min(H, W)``; ``None`` keeps the size.
        flips: draw a left-right and an up-down flip per sample with probability 1/2 each.

    Returns:
        The augmented ``(low, high)``.
    """
    b, _, h, w = low.shape
    if crop_size is not None and (crop_size, crop_size) != (h, w):
        if crop_size > min(h, w):
            raise DataError(f"crop_size {crop_size} is larger than the {h}×{w} images; lower data.crop_size")
        top = torch.randint(0, h - crop_size + 1, (b,), generator=generator)
        left = torch.randint(0, w - crop_size + 1, (b,), generator=generator)
        low, high = joint_crop(low, high, top, left, crop_size)
    if flips:
        f = torch.rand(2, b, generator=generator) < 0.5
        f = f.to(low.device)
        low, high = joint_flip(low, high, f[0], f[1])
    return low, high


# ------------------------------------------------------------------------------------------------------ loader


class PairLoader:
    """Batches of ``(low, high)`` float ``[B, 3, H, W]`` in [0, 1] on ``device``.

    Training (``train=True``): each epoch visits a permutation drawn from ``(seed, epoch)``, cut into global batches
    of ``world_size × batch_size`` of which rank ``r`` takes the ``r``-th slice (``kdforge.data.loader.train_shard``,
    as the CIFAR loader); every image gets one random ``crop_size`` square and joint flips, drawn on the host from a
    stream of ``(seed, epoch, rank)``. When every pair has one size (the synthetic CIFAR set) whole images go to the
    device and :func:`random_joint_augment` crops and flips there; otherwise (real photographs of mixed sizes) the
    crop is cut on the host, a view, before the transfer, and the flips run on the device. The last incomplete batch
    is dropped. Evaluation: every pair once, in order, whole; consecutive pairs of one size are stacked up to
    ``batch_size``, and rank ``r`` takes batches ``r, r + W, ...`` so the ranks together see every pair exactly once.

    Args:
        pairs: the pair set.
        batch_size: images per batch.
        train: training or evaluation order and augmentation.
        crop_size: training crop side (``None``: whole images, which must then share one size).
        device: where batches are delivered.
        seed: base seed of the permutation and the augmentation.
        flips: random joint flips in training.
        rank, world_size: this process's shard of a distributed run.
    """

    def __init__(
        self,
        pairs: PairSet,
        batch_size: int,
        *,
        train: bool,
        crop_size: int | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        flips: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if len(pairs) == 0:
            raise DataError("the pair set is empty")
        if train:
            smallest = min(min(pairs.size(i)) for i in range(len(pairs)))
            if crop_size is not None and crop_size > smallest:
                i = min(range(len(pairs)), key=lambda k: min(pairs.size(k)))
                h, w = pairs.size(i)
                raise DataError(f"image {pairs.names[i]} is {h}×{w}, smaller than crop_size {crop_size}")
            if crop_size is None and len({pairs.size(i) for i in range(len(pairs))}) > 1:
                raise DataError("training images differ in size; set crop_size to train on random crops")
            if len(pairs) < batch_size * world_size:
                raise DataError(
                    f"{len(pairs)} training pairs are fewer than one global batch ({world_size} × {batch_size})"
                )
        self.pairs, self.batch_size, self.train = pairs, batch_size, train
        self.crop_size, self.device, self.seed, self.flips = crop_size, torch.device(device), seed, flips
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._one_size = len({pairs.size(i) for i in range(len(pairs))}) == 1

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation and augmentation stream of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return len(self.pairs) // (self.batch_size * self.world_size)
        return len(self._eval_batches())

    def _eval_batches(self) -> list[list[int]]:
        batches: list[list[int]] = []
        for i in range(len(self.pairs)):
            if batches and len(batches[-1]) < self.batch_size and self.pairs.size(batches[-1][0]) == self.pairs.size(i):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches[self.rank :: self.world_size]

    def _to_device(self, lows: list[Tensor], highs: list[Tensor]) -> tuple[Tensor, Tensor]:
        low = torch.stack(lows).to(self.device, non_blocking=True).float().div_(255.0)
        high = torch.stack(highs).to(self.device, non_blocking=True).float().div_(255.0)
        return low, high

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if not self.train:
            for idx in self._eval_batches():
                got = [self.pairs.pair(i) for i in idx]
                yield self._to_device([g[0] for g in got], [g[1] for g in got])
            return
        order = train_shard(
            len(self.pairs),
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
        ).tolist()
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        s = self.crop_size
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            if self._one_size:
                got = [self.pairs.pair(i) for i in idx]
                low, high = self._to_device([g[0] for g in got], [g[1] for g in got])
                yield random_joint_augment(low, high, gen, s, self.flips)
                continue
            lows, highs = [], []
            for i in idx:
                low, high = self.pairs.pair(i)
                if s is not None:
                    h, w = low.shape[-2:]
                    top = int(torch.randint(0, h - s + 1, (1,), generator=gen))
                    left = int(torch.randint(0, w - s + 1, (1,), generator=gen))
                    low, high = low[:, top : top + s, left : left + s], high[:, top : top + s, left : left + s]
                lows.append(low)
                highs.append(high)
            low, high = self._to_device(lows, highs)
            if self.flips:
                f = (torch.rand(2, len(idx), generator=gen) < 0.5).to(self.device)
                low, high = joint_flip(low, high, f[0], f[1])
            yield low, high


# ------------------------------------------------------------------------------------------- task datasets


class EnhancementLoader(PairLoader):
    """:class:`PairLoader` order and augmentation as the engine's loader: ``Batch`` objects, resumable mid-epoch.

    Yields ``Batch(input=low, target=zeros, index, targets=high)`` with ``low``/``high`` float ``[B, 3, H, W]`` in
    [0, 1] on the device. The input is **not** mean/std-normalised (the enhancement task's convention: residual
    networks map an image to an image of the same range). Training randomness (crop offsets, flips) is drawn per
    batch from ``(seed, epoch, rank, batch)``, so ``set_epoch(epoch, start_batch)`` resumes an epoch exactly where a
    checkpoint left it; the permutation is :class:`PairLoader`'s (``train_shard``).

    Args: those of :class:`PairLoader`.
    """

    def __init__(self, pairs: PairSet, batch_size: int, **kwargs: object) -> None:
        super().__init__(pairs, batch_size, **kwargs)  # type: ignore[arg-type]
        self.num_samples = self.dataset_size = len(pairs)
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:  # type: ignore[override]
        """Select the permutation and augmentation of ``epoch``, starting at batch ``start_batch`` (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _batch(self, idx: list[int], low: Tensor, high: Tensor) -> Batch:
        index = torch.tensor(idx, dtype=torch.int64, device=self.device)
        return Batch(low, torch.zeros(len(idx), dtype=torch.int64, device=self.device), index, targets=high)

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        start, self.start_batch = self.start_batch, 0
        if not self.train:
            for idx in self._eval_batches()[start:]:
                got = [self.pairs.pair(i) for i in idx]
                yield self._batch(idx, *self._to_device([g[0] for g in got], [g[1] for g in got]))
            return
        order = train_shard(
            len(self.pairs), self.batch_size, seed=self.seed, epoch=self.epoch, rank=self.rank,
            world_size=self.world_size,
        ).tolist()  # fmt: skip
        s = self.crop_size
        for k in range(start, len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank, k, 11))
            got = [self.pairs.pair(i) for i in idx]
            if self._one_size:  # whole images to the device, cropped and flipped there in one gather
                low, high = self._to_device([g[0] for g in got], [g[1] for g in got])
                low, high = random_joint_augment(low, high, gen, s, self.flips)
                yield self._batch(idx, low, high)
                continue
            lows, highs = [], []
            for low, high in got:  # mixed sizes: the crop is cut on the host (a view) before the transfer
                h, w = low.shape[-2:]
                top = int(torch.randint(0, h - s + 1, (1,), generator=gen))  # type: ignore[operator]
                left = int(torch.randint(0, w - s + 1, (1,), generator=gen))  # type: ignore[operator]
                lows.append(low[:, top : top + s, left : left + s])  # type: ignore[operator]
                highs.append(high[:, top : top + s, left : left + s])  # type: ignore[operator]
            low, high = self._to_device(lows, highs)
            low, high = random_joint_augment(low, high, gen, None, self.flips)
            yield self._batch(idx, low, high)


#: The statistics of the task's inputs: none (raw [0, 1]); recorded in ``DataBundle.mean``/``std``.
RAW_MEAN, RAW_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
#: default training crop side of the ``lol`` dataset (LOL images are 400×600)
LOL_CROP = 128


def _subset(pairs: PairSet, n: int | None) -> PairSet:
    """The first ``n`` pairs (a prefix: synthetic pairs degrade the same whatever the set's size)."""
    if n is None or n >= len(pairs):
        return pairs
    if n < 1:
        raise DataError(f"a subset needs at least one pair, got {n}")
    if isinstance(pairs, InMemoryPairs):
        return InMemoryPairs(pairs.lows[:n], pairs.highs[:n], pairs.names[:n])
    if isinstance(pairs, PairedFolder):
        sub = object.__new__(PairedFolder)
        sub.paths, sub.names, sub._sizes = pairs.paths[:n], pairs.names[:n], pairs._sizes[:n]
        return sub
    raise DataError(f"cannot take a subset of {type(pairs).__name__}")


def _bundle(
    train: PairSet,
    test: PairSet,
    *,
    batch_size: int,
    eval_batch_size: int,
    crop_size: int | None,
    image_size: int,
    augment: bool,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
) -> DataBundle:
    common = {"device": device, "rank": rank, "world_size": world_size}
    train_loader = EnhancementLoader(
        train, batch_size, train=True, crop_size=crop_size, seed=seed, flips=augment, **common
    )
    test_loader = EnhancementLoader(test, eval_batch_size, train=False, **common)
    return DataBundle(train_loader, test_loader, 0, [], image_size, RAW_MEAN, RAW_STD, len(train))


@DATASETS.register(
    "cifar10_lowlight", kind="task", task="enhancement", num_classes=0, image_size=32,
    description="no download: CIFAR-10 images as targets, synthetic low-light inputs (Lv et al. degradation)",
)  # fmt: skip
def _cifar10_lowlight(req: DataRequest) -> DataBundle:
    """CIFAR-10 images (``cifar10_source(root)``: the embedded 10k/2k subset without ``data.root``) as normal-light
    targets, their synthetic low-light versions as inputs (``kdforge.data.synth.lowlight``): the training split
    degraded with the run's seed, the test split always with ``TEST_SEED``. ``data.train_subset``/``test_subset``
    keep the first images. Training: random joint crops of ``data.image_size`` (default 32 = the whole image) and,
    with ``data.augment``, random joint horizontal/vertical flips; evaluation: whole images."""
    # Imported here: the synthesis module builds on this one's pair sets.
    from kdforge.data.synth.lowlight import TEST_SEED, lowlight_pairs_from_arrays

    src = cifar10_source(req.root, req.download)
    side = src.train_images.shape[-1]
    size = req.image_size or side
    if size > side:
        raise DataError(f"data.image_size {size} is larger than the {side} px CIFAR images; use at most {side}")
    n_train = len(src.train_images) if req.train_subset is None else min(req.train_subset, len(src.train_images))
    n_test = len(src.test_images) if req.test_subset is None else min(req.test_subset, len(src.test_images))
    if n_train < 1 or n_test < 1:
        got = f"{req.train_subset}, {req.test_subset}"
        raise DataError(f"data.train_subset and data.test_subset must be >= 1, got {got}")
    train = lowlight_pairs_from_arrays(src.train_images[:n_train], req.seed)
    test = lowlight_pairs_from_arrays(src.test_images[:n_test], TEST_SEED)
    return _bundle(
        train, test, batch_size=req.batch_size, eval_batch_size=req.eval_batch_size,
        crop_size=None if size == side else size, image_size=size, augment=req.augment, seed=req.seed, **req.shard(),
    )  # fmt: skip


@DATASETS.register(
    "lol", kind="task", task="enhancement", num_classes=0, image_size=LOL_CROP,
    description="your pairs: the LOL layout in data.root (our485/{low,high} train, eval15/{low,high} test)",
)  # fmt: skip
def _lol(req: DataRequest) -> DataBundle:
    """A LOL-layout folder (:func:`lol_split`): ``our485`` for training on random ``data.image_size`` crops (default
    128) with joint flips when ``data.augment``, ``eval15`` evaluated on whole images (same-size images batched)."""
    if req.root is None:
        raise DataError("dataset 'lol' needs data.root: a folder with our485/{low,high} and eval15/{low,high}")
    if req.download:
        raise DataError("dataset 'lol' cannot be downloaded by kdforge; unpack LOL into data.root")
    train = _subset(lol_split(req.root, "train"), req.train_subset)
    test = _subset(lol_split(req.root, "eval"), req.test_subset)
    size = req.image_size or LOL_CROP
    return _bundle(
        train, test, batch_size=req.batch_size, eval_batch_size=req.eval_batch_size, crop_size=size, image_size=size,
        augment=req.augment, seed=req.seed, **req.shard(),
    )  # fmt: skip

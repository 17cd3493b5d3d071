"""Image folders (``root/train/<class>/*.jpg``, ``root/val/<class>/...``): users' own data and ImageNet.

Images are decoded and resized in DataLoader worker processes (Pillow), batched as uint8 and normalized on the
training device. Per-sample randomness is derived from ``(seed, epoch, index)``, so a sample's crop does not depend
on which worker decoded it, and an epoch is reproducible and resumable like the tensor loader's. Negatives (triplet
KD, AMKD) are drawn per batch in the sampler, from the labels and the batch's ``(seed, epoch, rank, batch)``, and
decoded by the workers beside their anchors.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from kdforge.data.augment import normalize
from kdforge.data.batch import Batch
from kdforge.data.jda import JDAPolicy, jda_augment
from kdforge.data.loader import NegativeSampler, mix_seed, train_shard
from kdforge.errors import DataError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def scan_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """``[(path, label)]`` sorted by class then file name, and the class names (sorted sub-folder names).

    Args:
        split_dir: ``root/train`` or ``root/val``.
        classes: the training split's classes, to check that a validation split matches them.
    """
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir} does not exist; an image-folder dataset needs root/train/<class>/ and root/val/<class>/"
        )
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class>/")
    if classes is not None and found != classes:
        extra = sorted(set(found) - set(classes)) or sorted(set(classes) - set(found))
        raise DataError(f"{split_dir} has other class folders than the training split (e.g. {extra[0]!r})")
    samples = []
    for label, name in enumerate(found):
        files = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            kinds = ", ".join(sorted(EXTENSIONS))
            raise DataError(f"{split_dir / name} holds no images ({kinds}); add some or remove the folder")
        samples += [(p, label) for p in files]
    return samples, found


def _random_resized_box(w: int, h: int, rng: random.Random, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: area share in ``scale``, aspect ratio in [3/4, 4/3] (log-uniform)."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, x + cw, y + ch
    side = min(w, h)  # fall back to the central square
    x, y = (w - side) // 2, (h - side) // 2
    return x, y, x + side, y + side


class ImageFolderDataset(Dataset):
    """Decodes one image per item; train: random-resized crop + flip, eval: resize + centre crop.

    Args:
        samples: ``[(path, label)]`` (from :func:`scan_folder`, possibly subset) or a split folder to scan.
        image_size: output side ``S``.
        train: random-resized crop + flip instead of resize + centre crop.
        seed: base of the per-sample crop randomness.
        scale: area share range of the random-resized crop.
        classes: expected class names when ``samples`` is a folder (a validation split must match training).

    Normalization is not done here: the loader normalizes whole batches on the training device.

    Items are requested as ``(index, epoch)`` pairs (by :class:`EpochSampler`) and returned as
    ``(uint8 [3, S, S], label, index, error)``; a file that cannot be read yields ``error`` = a message naming it,
    turned into a :class:`DataError` in the main process (one line, not a worker traceback). An
    ``(index, epoch, negative)`` triple also returns the negative sample's image and index,
    ``(..., uint8 [3, S, S], negative)``, transformed like the anchor with randomness of its own.
    """

    def __init__(
        self,
        samples: list[tuple[Path, int]] | str | Path,
        image_size: int,
        *,
        train: bool,
        seed: int = 0,
        scale: tuple[float, float] = (0.08, 1.0),
        classes: list[str] | None = None,
    ) -> None:
        if isinstance(samples, (str, Path)):
            samples, classes = scan_folder(Path(samples), classes)
        self.samples, self.image_size, self.train, self.seed, self.scale = samples, image_size, train, seed, scale
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path, rng: random.Random) -> Image.Image:
        s = self.image_size
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.train:
            box = _random_resized_box(img.width, img.height, rng, self.scale)
            img = img.resize((s, s), Image.BILINEAR, box=box)
            return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img
        # Evaluation: shorter side to S/0.875 (256 for 224), then the central S×S.
        short = round(s / 0.875)
        w, h = img.size
        nw, nh = (short, max(1, round(h * short / w))) if w <= h else (max(1, round(w * short / h)), short)
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - s) // 2, (nh - s) // 2
        return img.crop((left, top, left + s, top + s))

    def _image(self, index: int, rng: random.Random) -> tuple[torch.Tensor, str]:
        path = self.samples[index][0]
        try:
            img = self._load(path, rng)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            empty = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
            return empty, f"cannot read image {path}: {err}"
        return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()), ""

    def __getitem__(self, item: tuple[int, ...]) -> tuple[Any, ...]:
        index, epoch = item[0], item[1]
        label = self.samples[index][1]
        img, error = self._image(index, random.Random(mix_seed(self.seed, epoch, index)))
        if len(item) == 2:
            return img, label, index, error
        negative = item[2]
        # Seeded by the (anchor, negative) pair: a sample drawn as a negative gets another crop than as an anchor.
        neg_img, neg_error = self._image(negative, random.Random(mix_seed(self.seed, epoch, index, negative, 3)))
        return img, label, index, error or neg_error, neg_img, negative


class EpochSampler(Sampler):
    """Yields ``(index, epoch)``: this rank's slices of the ``(seed, epoch)`` global batches (train, see
    :func:`~kdforge.data.loader.train_shard`), or this rank's
    strided share in order (eval), from ``start_batch`` on. With ``negatives`` set (training only) it yields
    ``(index, epoch, negative)``, the negatives of batch ``b`` drawn from ``(seed, epoch, rank, b)``."""

    def __init__(self, n: int, batch_size: int, *, train: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.batch_size, self.train = n, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0
        self.negatives: NegativeSampler | None = None

    def indices(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.n, self.world_size))
        shard = train_shard(
            self.n, self.batch_size, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size
        )
        return shard.tolist()

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        todo = self.indices()[self.start_batch * self.batch_size :]
        if self.negatives is None or not self.train:
            for i in todo:
                yield i, self.epoch
            return
        for b in range(0, len(todo), self.batch_size):
            chunk = todo[b : b + self.batch_size]
            batch_no = self.start_batch + b // self.batch_size
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank, batch_no, 3))
            negs = self.negatives(self.negatives.labels[torch.tensor(chunk)], g).tolist()
            for i, neg in zip(chunk, negs, strict=True):
                yield i, self.epoch, neg

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start_batch * self.batch_size)


class FolderLoader:
    """Batches of an :class:`ImageFolderDataset` through a ``DataLoader``, normalized on ``device``."""

    def __init__(
        self,
        dataset: ImageFolderDataset,
        batch_size: int,
        *,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        num_workers: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        views: JDAPolicy | None = None,
        negatives: bool = False,
        bad_images: str = "fail",
    ) -> None:
        if bad_images not in ("fail", "skip"):
            raise DataError(f"data.bad_images must be fail or skip, got {bad_images!r}")
        self.bad_images = bad_images
        self.skipped_images = 0  # images dropped so far under bad_images=skip (the engine logs it per epoch)
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.mean, self.std, self.device = mean, std, torch.device(device)
        self.channels_last, self.views, self.seed, self.rank = channels_last, views, seed, rank
        self.world_size = world_size
        self.num_samples = len(dataset)
        self._start = 0
        self.sampler = EpochSampler(len(dataset), batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            drop_last=False,
        )
        self.negatives = negatives

    @property
    def negatives(self) -> bool:
        """Whether training batches carry ``Batch.negative`` (one other-class sample per anchor)."""
        return self.sampler.negatives is not None

    @negatives.setter
    def negatives(self, on: bool) -> None:
        if not (on and self.train):
            self.sampler.negatives = None
            return
        self.sampler.negatives = NegativeSampler(torch.tensor([label for _, label in self.dataset.samples]))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
        self._start = start_batch

    def __len__(self) -> int:
        n = len(self.sampler.indices())
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        out = normalize(x, self.mean, self.std)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __iter__(self) -> Iterator[Batch]:
        for i, (images, labels, index, errors, *negative) in enumerate(self.loader, start=self._start):
            bad = next((e for e in errors if e), None)
            if bad and self.bad_images == "fail":
                raise DataError(f"{bad} (data.bad_images=skip drops such images and counts them)")
            if bad:
                keep = torch.tensor([not e for e in errors])
                self.skipped_images += int((~keep).sum())
                if not keep.any():
                    continue
                images, labels, index = images[keep], labels[keep], index[keep]
                negative = [t[keep] for t in negative]
            images = images.to(self.device, non_blocking=True)
            views: tuple[torch.Tensor, ...] = ()
            if self.train and self.views is not None:
                g = torch.Generator(device=self.device).manual_seed(
                    mix_seed(self.seed, self.sampler.epoch, self.rank, i, 2)
                )
                views = (self._finish(jda_augment(images, self.views, g)),)
            neg = neg_idx = None
            if negative:
                neg = self._finish(negative[0].to(self.device, non_blocking=True))
                neg_idx = negative[1].to(self.device, torch.int64, non_blocking=True)
            yield Batch(
                self._finish(images),
                labels.to(self.device, torch.int64, non_blocking=True),
                index.to(self.device, non_blocking=True),
                views,
                neg,
                neg_idx,
            )
        self.sampler.start_batch, self._start = 0, 0


__all__ = ["EpochSampler", "FolderLoader", "ImageFolderDataset", "scan_folder"]

"""Semantic-segmentation datasets on disk (Pascal VOC and Cityscapes layouts) and in memory, and their batching.

VOC layout (``root`` = ``VOCdevkit/VOC2012`` or any folder shaped like it)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png            palette ("P") PNGs: pixel value = class index, 255 = border (ignored)
    ImageSets/Segmentation/<split>.txt    one <id> per line

Cityscapes layout (``root`` holds both folders; masks from cityscapesScripts' ``createTrainIdLabelImgs``)::

    leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png    grayscale: trainId 0..18, 255 = ignored

Every sample is checked when read: a mask of another size than its image, or a label value that is neither a class
(``0..K-1``) nor the ignore index, raises one :class:`~kdforge.errors.DataError` naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kdforge.data import DataBundle, DataRequest, cifar10_source
from kdforge.data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, normalize
from kdforge.data.batch import Batch
from kdforge.data.dense_augment import random_scale_crop_flip
from kdforge.data.dense_loader import DenseTensorLoader
from kdforge.data.loader import train_shard
from kdforge.data.synth.segmentation import SEG_CLASSES, SegArrays, cifar_segmentation_splits
from kdforge.errors import DataError
from kdforge.registry import DATASETS
from kdforge.seeding import mix_seed

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip

Layout = Literal["voc", "cityscapes", "auto"]


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """Class names from a text file, one per line (blank lines skipped); exactly ``num_classes`` of them."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"class-names file {p} does not exist; give a text file with one class name per line")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != num_classes:
        raise DataError(f"class-names file {p} lists {len(names)} names for {num_classes} classes; give one per class")
    return names


def scan_voc(root: Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths of a VOC-layout split, in the order of ``ImageSets/Segmentation/<split>.txt``."""
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file} not found: a VOC-layout root needs ImageSets/Segmentation/{split}.txt")
    ids = [line.strip().split()[0] for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = []
    for name in ids:
        img, mask = root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png"
        for p in (img, mask):
            if not p.is_file():
                raise DataError(
                    f"{p} is listed in {list_file} but missing; restore it or remove '{name}' from that list"
                )
        pairs.append((img, mask))
    return pairs


def scan_cityscapes(root: Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths of a Cityscapes split, sorted by city and name."""
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        raise DataError(f"{img_dir} not found: a Cityscapes root needs leftImg8bit/{split}/<city>/*_leftImg8bit.png")
    pairs = []
    for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        mask = root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not mask.is_file():
            raise DataError(
                f"{mask} missing for {img.name}; "
                "create the trainId masks with cityscapesScripts' createTrainIdLabelImgs"
            )
        pairs.append((img, mask))
    return pairs


def detect_layout(root: Path) -> Literal["voc", "cityscapes"]:
    """``"voc"`` when ``root/ImageSets/Segmentation`` exists, ``"cityscapes"`` when ``root/leftImg8bit`` does."""
    if (root / "ImageSets" / "Segmentation").is_dir():
        return "voc"
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    raise DataError(
        f"{root} is neither a VOC root (ImageSets/Segmentation/) nor a Cityscapes root (leftImg8bit/, gtFine/)"
    )


def read_mask(path: Path, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """A label PNG as ``[H, W]`` int64 class indices, checked against ``0..K-1`` and ``ignore_index``.

    Palette (``P``) and grayscale (``L``) PNGs carry the class index in the pixel value; an RGB colour mask does not
    and is refused with a hint.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(
                    f"{path} is a {im.mode} image; label masks must be palette or grayscale PNGs whose pixel value "
                    "is the class index (convert colour masks to index masks first)"
                )
            mask = np.asarray(im, dtype=np.int64)
    except OSError as err:
        raise DataError(f"cannot read label mask {path}: {err}") from err
    bad = (mask >= num_classes) & (mask != ignore_index) | (mask < 0)
    if bad.any():
        values = sorted({int(v) for v in np.unique(mask[bad])})[:5]
        raise DataError(
            f"{path} holds label value(s) {values}, outside 0..{num_classes - 1} and not the ignore index "
            f"{ignore_index}; check num_classes or remap the mask"
        )
    return mask


def read_image(path: Path) -> np.ndarray:
    """An image file as ``[3, H, W]`` uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from err


class SegmentationFolder:
    """A VOC- or Cityscapes-layout split, decoded lazily sample by sample.

    Args:
        root: dataset root.
        split: ``train``, ``val``, ... (the list-file name for VOC, the folder name for Cityscapes).
        layout: ``"voc"``, ``"cityscapes"`` or ``"auto"`` (detected from the folders).
        num_classes: K (default: 21 for VOC, 19 for Cityscapes).
        ignore_index: label value of ignored pixels.
        class_names_file: optional text file with one class name per line.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        layout: Layout = "auto",
        num_classes: int | None = None,
        ignore_index: int = 255,
        class_names_file: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"segmentation dataset root {self.root} does not exist")
        self.layout = detect_layout(self.root) if layout == "auto" else layout
        if self.layout == "voc":
            self.samples = scan_voc(self.root, split)
            default_names = VOC_CLASSES
        elif self.layout == "cityscapes":
            self.samples = scan_cityscapes(self.root, split)
            default_names = CITYSCAPES_CLASSES
        else:
            raise DataError(f"unknown segmentation layout {layout!r}; use 'voc', 'cityscapes' or 'auto'")
        if not self.samples:
            raise DataError(
                f"split '{split}' of {self.root} ({self.layout} layout) has no samples; check the split name"
            )
        self.num_classes = num_classes or len(default_names)
        self.ignore_index = ignore_index
        if class_names_file is not None:
            self.classes = read_class_names(class_names_file, self.num_classes)
        elif self.num_classes == len(default_names):
            self.classes = list(default_names)
        else:
            self.classes = [str(k) for k in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i``: ``(image [3, H, W] uint8, mask [H, W] int64)``."""
        img_path, mask_path = self.samples[i]
        image = read_image(img_path)
        mask = read_mask(mask_path, self.num_classes, self.ignore_index)
        if image.shape[1:] != mask.shape:
            raise DataError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {img_path} is "
                f"{image.shape[2]}x{image.shape[1]}; masks must have their image's size"
            )
        return image, mask


def pad_collate(
    samples: Sequence[tuple[np.ndarray, np.ndarray]], ignore_index: int = 255, size_divisor: int = 1
) -> tuple[Tensor, Tensor]:
    """Stacks samples of different sizes: images padded with 0, masks with ``ignore_index``, at the bottom right.

    Args:
        samples: ``(image [3, H, W] uint8, mask [H, W] int)`` pairs.
        ignore_index: fill of padded mask pixels (they count nowhere).
        size_divisor: pad the batch size up to a multiple of this (a network's output stride).

    Returns:
        ``(images [B, 3, H, W] uint8, masks [B, H, W] int64)``.
    """
    h = max(img.shape[1] for img, _ in samples)
    w = max(img.shape[2] for img, _ in samples)
    h, w = -(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor
    images = torch.zeros(len(samples), 3, h, w, dtype=torch.uint8)
    masks = torch.full((len(samples), h, w), ignore_index, dtype=torch.int64)
    for i, (img, mask) in enumerate(samples):
        images[i, :, : img.shape[1], : img.shape[2]] = torch.from_numpy(img)
        masks[i, : mask.shape[0], : mask.shape[1]] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
    return images, masks


@dataclass
class SegTensors:
    """An in-memory split as tensors: ``images [N, 3, H, W]`` uint8 and ``masks [N, H, W]`` int64."""

    images: Tensor
    masks: Tensor
    classes: list[str]

    @classmethod
    def from_arrays(cls, arrays: SegArrays) -> SegTensors:
        return cls(torch.from_numpy(arrays.images), torch.from_numpy(arrays.masks.astype(np.int64)), arrays.classes)

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images [B, 3, H, W] uint8, masks [B, H, W] int64)`` batches on ``device``; a seeded permutation when
        ``shuffle``; the last batch may be smaller."""
        n = len(self.images)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield self.images[idx].to(device), self.masks[idx].to(device)


#: scale range of the joint random scale/crop/flip for training batches (mmseg's CIFAR-scale default is (0.5, 2.0);
#: the 64-px canvases lose their small objects below 0.75)
TRAIN_SCALES = (0.75, 1.5)


def _seg_augment(ignore_index: int, scales: tuple[float, float] = TRAIN_SCALES):
    def augment(x: Tensor, masks: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return random_scale_crop_flip(x, masks, scale_range=scales, ignore_index=ignore_index, generator=g)

    return augment


@DATASETS.register(
    "cifar10_seg", kind="task", task="segmentation", num_classes=11, image_size=64,
    description="no download: CIFAR-10 objects pasted through random masks on 64x64 canvases (11 classes)",
)  # fmt: skip
def _cifar10_seg(req: DataRequest) -> DataBundle:
    """Canvases from the embedded CIFAR-10 subset (``data.root`` unset) or the full set (``data.root`` = the JPEG
    ``.npz`` or the archive folder); ``data.train_subset``/``test_subset`` are the canvas counts (default 5,000 /
    1,000), ``data.image_size`` the canvas side. The canvases are the same for every run (dataset seed 0); the run's
    seed shuffles and augments them."""
    src = cifar10_source(req.root, req.download)
    size = req.image_size or 64
    train, test = cifar_segmentation_splits(
        src.train_images,
        src.train_labels,
        src.test_images,
        src.test_labels,
        num_train=req.train_subset or 5000,
        num_test=req.test_subset or 1000,
        size=size,
        seed=0,
    )
    common = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, **req.shard()}
    train_loader = DenseTensorLoader(
        torch.from_numpy(train.images),
        torch.from_numpy(train.masks.astype(np.int64)),
        req.batch_size,
        train=True,
        seed=req.seed,
        augment=_seg_augment(255) if req.augment else None,
        **common,
    )
    test_loader = DenseTensorLoader(
        torch.from_numpy(test.images),
        torch.from_numpy(test.masks.astype(np.int64)),
        req.eval_batch_size,
        train=False,
        **common,
    )
    return DataBundle(
        train_loader,
        test_loader,
        len(SEG_CLASSES),
        list(SEG_CLASSES),
        size,
        CIFAR10_MEAN,
        CIFAR10_STD,
        len(train.images),
    )


class FolderSegLoader:
    """Batches of a VOC/Cityscapes-layout split decoded once into memory (images of any size).

    Training batches are padded to their largest image (:func:`pad_collate`, padding ignored) and then scaled,
    cropped to ``image_size × image_size`` and flipped jointly on the device; evaluation batches keep every image at
    its own size, padded to a multiple of 8 with ignored pixels, so the metric counts the original pixels exactly.
    """

    def __init__(
        self,
        dataset: SegmentationFolder,
        batch_size: int,
        *,
        train: bool,
        image_size: int,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
    ) -> None:
        self.samples = [dataset[i] for i in range(len(dataset))]  # decoded and checked once
        self.ignore_index = dataset.ignore_index
        self.batch_size, self.train, self.image_size, self.device = batch_size, train, image_size, device
        self.seed, self.rank, self.world_size, self.augment = seed, rank, world_size, augment
        self.num_samples = self.dataset_size = len(self.samples)
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // (self.world_size * self.batch_size)
        return -(-len(range(self.rank, self.num_samples, self.world_size)) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self.train:
            shard = train_shard(
                self.num_samples, self.batch_size, seed=self.seed, epoch=self.epoch, rank=self.rank,
                world_size=self.world_size,
            )  # fmt: skip
            order = list(shard.view(-1, self.batch_size))
        else:
            order = list(torch.split(torch.arange(self.rank, self.num_samples, self.world_size), self.batch_size))
        for i in range(self.start_batch, len(order)):
            idx = order[i]
            images, masks = pad_collate([self.samples[j] for j in idx.tolist()], self.ignore_index, size_divisor=8)
            x, masks = images.to(self.device).float().div_(255.0), masks.to(self.device)
            if self.train:
                s = self.image_size
                g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.rank, i, 7))
                scales = TRAIN_SCALES if self.augment else (1.0, 1.0)
                flip = 0.5 if self.augment else 0.0
                x, masks = random_scale_crop_flip(x, masks, (s, s), scales, flip, self.ignore_index, g)
            x = normalize(x.mul(255.0), IMAGENET_MEAN, IMAGENET_STD)
            yield Batch(
                x, torch.zeros(len(idx), dtype=torch.int64, device=self.device), idx.to(self.device), targets=masks
            )
        self.start_batch = 0


@DATASETS.register(
    "seg_folder", kind="task", task="segmentation", num_classes=None, image_size=512,
    description="your masks: a Pascal VOC or Cityscapes (trainId) layout in data.root, splits train and val",
)  # fmt: skip
def _seg_folder(req: DataRequest) -> DataBundle:
    """A VOC or Cityscapes layout (detected from the folders) with ``train`` and ``val`` splits; training crops of
    ``data.image_size`` (default 512)."""
    if req.root is None:
        raise DataError("dataset 'seg_folder' needs data.root: a Pascal VOC or Cityscapes (trainId) layout")
    train_set = SegmentationFolder(req.root, "train")
    test_set = SegmentationFolder(req.root, "val", layout=train_set.layout, num_classes=train_set.num_classes)
    size = req.image_size or 512
    common = {"device": req.device, "rank": req.rank, "world_size": req.world_size, "image_size": size}
    train = FolderSegLoader(train_set, req.batch_size, train=True, seed=req.seed, augment=req.augment, **common)
    test = FolderSegLoader(test_set, req.eval_batch_size, train=False, **common)
    return DataBundle(
        train, test, train_set.num_classes, train_set.classes, size, IMAGENET_MEAN, IMAGENET_STD, len(train_set)
    )


__all__ = [
    "CITYSCAPES_CLASSES",
    "VOC_CLASSES",
    "FolderSegLoader",
    "SegTensors",
    "SegmentationFolder",
    "detect_layout",
    "pad_collate",
    "read_class_names",
    "read_image",
    "read_mask",
    "scan_cityscapes",
    "scan_voc",
]

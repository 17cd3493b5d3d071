"""Datasets of the ``oriented_detection`` task: ``cifar10_obb`` (no download: CIFAR-10 objects stretched and pasted
rotated onto canvases, :mod:`kdforge.data.synth.oriented`) and ``dota`` (a DOTA-format folder,
:mod:`kdforge.data.dota`).

Batches carry ``targets = {"rboxes": [B, M, 5] le90 pixels, "labels": [B, M] (-1 padding), "image_id": [B]}`` and,
for ``dota``, ``"difficult": [B, M]`` — the format of :class:`kdforge.tasks.oriented.OrientedDetectionTask`.
Training batches get a random element of the dihedral group (quarter turns and a mirror, exact for rotated boxes,
:func:`kdforge.data.synth.oriented.random_flip_rot90`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kdforge.data import DataBundle, DataRequest, cifar10_source
from kdforge.data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from kdforge.data.dense_loader import DenseTensorLoader, JointAugment
from kdforge.data.detection import letterbox
from kdforge.data.dota import DOTA_V1_CLASSES, DOTA_V15_CLASSES, DotaDataset
from kdforge.data.synth.oriented import make_oriented_synth, random_flip_rot90
from kdforge.errors import DataError
from kdforge.registry import DATASETS


def oriented_augment(rotate: bool = True) -> JointAugment:
    """The joint training augmentation of the oriented datasets for :class:`DenseTensorLoader`: per sample ``k``
    quarter turns (square images; else 0 or 2) and a left-right mirror with probability ½, images and rotated boxes
    together; other target entries pass through."""

    def augment(x: Tensor, targets: dict[str, Tensor], g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x, rboxes = random_flip_rot90(x, targets["rboxes"], targets["labels"], generator=g, rotate=rotate)
        return x, {**targets, "rboxes": rboxes}

    return augment


@DATASETS.register(
    "cifar10_obb", kind="task", task="oriented_detection", num_classes=10, image_size=96,
    description="no download: 1-4 CIFAR-10 objects stretched to 2-4:1 and pasted rotated on 96x96 canvases, "
    "exact rotated boxes and 10 classes",
)  # fmt: skip
def _cifar10_obb(req: DataRequest) -> DataBundle:
    """Canvases of :func:`kdforge.data.synth.oriented.make_oriented_synth` (dataset seed 0, the same for every run)
    from the embedded CIFAR-10 subset (``data.root`` unset) or the full set (``data.root`` = the JPEG ``.npz`` or the
    archive folder). ``data.train_subset``/``test_subset`` are the canvas counts (default 5,000 / 1,000),
    ``data.image_size`` the canvas side (a multiple of 16, default 96; the objects' long side, 28–56 px at 96, scales
    with it)."""
    size = req.image_size or 96
    if size % 16 != 0:
        raise DataError(
            f"cifar10_obb needs data.image_size a multiple of 16 (the detectors' largest stride), got {size}"
        )
    src = cifar10_source(req.root, req.download)
    classes = list(getattr(src, "classes", [str(k) for k in range(10)]))
    synth = make_oriented_synth(
        src.train_images, src.train_labels, src.test_images, src.test_labels, classes,
        num_train=req.train_subset or 5000, num_test=req.test_subset or 1000, seed=0, canvas=size,
        long_side=(28.0 * size / 96, 56.0 * size / 96),
    )  # fmt: skip

    def targets(split) -> dict[str, Tensor]:
        return {"rboxes": split.rboxes, "labels": split.labels, "image_id": torch.arange(len(split))}

    common = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, **req.shard()}
    train_loader = DenseTensorLoader(
        synth.train.images, targets(synth.train), req.batch_size, train=True, seed=req.seed,
        augment=oriented_augment() if req.augment else None, **common,
    )  # fmt: skip
    test_loader = DenseTensorLoader(synth.test.images, targets(synth.test), req.eval_batch_size, train=False, **common)
    return DataBundle(train_loader, test_loader, 10, classes, size, CIFAR10_MEAN, CIFAR10_STD, len(synth.train))


def dota_classes(names: set[str]) -> list[str]:
    """The class list of a DOTA folder: DOTA v1.0's official 15 (devkit order) when every name found is one of them,
    v1.5's 16 when every name is one of those, else the names found, sorted."""
    if names <= set(DOTA_V1_CLASSES):
        return list(DOTA_V1_CLASSES)
    if names <= set(DOTA_V15_CLASSES):
        return list(DOTA_V15_CLASSES)
    return sorted(names)


def letterbox_dota(dataset: DotaDataset, size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Every image of ``dataset`` letterboxed to ``size`` (:func:`kdforge.data.detection.letterbox`: longer side to
    ``size``, zero padding right and bottom) with its boxes scaled by the same factor.

    Returns:
        ``(images uint8 [N, 3, size, size], {"rboxes": [N, M, 5], "labels": [N, M], "difficult": [N, M],
        "image_id": [N]})``.
    """
    n = len(dataset)
    m = max([1] + [int(a.labels.numel()) for a in dataset.annotations])
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    t = {
        "rboxes": torch.zeros(n, m, 5),
        "labels": torch.full((n, m), -1, dtype=torch.long),
        "difficult": torch.zeros(n, m, dtype=torch.bool),
        "image_id": torch.arange(n),
    }
    for i in range(n):
        image, target = dataset[i]
        images[i], scale = letterbox(image, size)
        k = int(target["labels"].numel())
        rb = target["rboxes"].clone()
        rb[:, :4] *= scale  # a uniform scale: centre and sides scale, the angle stays
        t["rboxes"][i, :k] = rb
        t["labels"][i, :k] = target["labels"]
        t["difficult"][i, :k] = target["difficult"]
    return images, t


@DATASETS.register(
    "dota", kind="task", task="oriented_detection", num_classes=None, image_size=512,
    description="your oriented boxes: DOTA-format folders train/ and val/ (each images/ + labelTxt/) in data.root",
)  # fmt: skip
def _dota(req: DataRequest) -> DataBundle:
    """A DOTA layout in ``data.root``: ``train/images`` + ``train/labelTxt`` and ``val/images`` + ``val/labelTxt``
    (e.g. DOTA_devkit ``ImgSplit`` 1024 × 1024 patches).

    Every image is letterboxed once to ``data.image_size`` (a multiple of 16, default 512) and held in memory; boxes
    are scaled by the same factor. The metric is computed on the letterboxed images: a uniform scale leaves every
    IoU, hence the mAP, unchanged. Difficult objects are trained on and ignored by the metric (DOTA's rule).
    ``data.train_subset``/``test_subset`` keep the first images by name. Normalised with the ImageNet statistics.
    """
    if req.root is None:
        raise DataError(
            "dataset 'dota' needs data.root: a folder with train/images, train/labelTxt, val/images and val/labelTxt"
        )
    size = req.image_size or 512
    if size % 16 != 0:
        raise DataError(f"dota needs data.image_size a multiple of 16 (the detectors' largest stride), got {size}")
    base = Path(req.root)
    # the names of both splits decide the class list, then both splits are read with it
    classes = dota_classes({n for split in ("train", "val") for n in DotaDataset(base / split).classes})
    train_set, test_set = (DotaDataset(base / split, classes=classes) for split in ("train", "val"))
    train_images, train_t = letterbox_dota(train_set, size)
    test_images, test_t = letterbox_dota(test_set, size)
    if req.train_subset is not None:
        train_images, train_t = train_images[: req.train_subset], {k: v[: req.train_subset] for k, v in train_t.items()}
    if req.test_subset is not None:
        test_images, test_t = test_images[: req.test_subset], {k: v[: req.test_subset] for k, v in test_t.items()}
    common = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **req.shard()}
    train_loader = DenseTensorLoader(
        train_images, train_t, req.batch_size, train=True, seed=req.seed,
        augment=oriented_augment() if req.augment else None, **common,
    )  # fmt: skip
    test_loader = DenseTensorLoader(test_images, test_t, req.eval_batch_size, train=False, **common)
    return DataBundle(
        train_loader, test_loader, len(classes), classes, size, IMAGENET_MEAN, IMAGENET_STD, len(train_images)
    )


__all__ = ["dota_classes", "letterbox_dota", "oriented_augment"]

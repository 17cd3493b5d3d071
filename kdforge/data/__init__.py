"""Datasets and loaders: CIFAR archives, the JPEG ``.npz`` format, the embedded subset, image folders, ImageNet.

``build_data(name, ...)`` returns a :class:`DataBundle` whose ``train``/``test`` loaders yield :class:`Batch` on the
training device. Every dataset is registered in ``DATASETS`` (``kdforge datasets`` lists them).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kdforge.data import augment as aug
from kdforge.data.batch import Batch
from kdforge.data.cifar import CIFAR10, CIFAR100, ArrayData, cache_dir, load_cifar, load_jpeg_npz
from kdforge.data.folder import FolderLoader, ImageFolderDataset, scan_folder
from kdforge.data.jda import JDAPolicy
from kdforge.data.loader import TensorLoader
from kdforge.data.synth.scenes import make_scenes
from kdforge.errors import DataError
from kdforge.registry import DATASETS

EMBEDDED_ASSET = "cifar10_subset.npz"


@dataclass(frozen=True)
class DataRequest:
    """What :func:`build_data` hands the builder of a task dataset (``kind="task"``): the run's data keys, resolved.

    One object instead of a dozen keyword arguments, so a new key reaches every task dataset without touching each
    builder's signature. The fields mean what :func:`build_data`'s arguments of the same names mean.
    """

    root: str | None
    download: bool
    batch_size: int
    eval_batch_size: int
    image_size: int | None
    augment: bool
    train_subset: int | None
    test_subset: int | None
    device: torch.device
    seed: int
    rank: int
    world_size: int

    def shard(self) -> dict[str, Any]:
        """``device``, ``rank`` and ``world_size`` as keyword arguments of a loader."""
        return {"device": self.device, "rank": self.rank, "world_size": self.world_size}


@dataclass
class DataBundle:
    """Train and test loaders plus what models and methods need to know about the data.

    Attributes:
        train: yields augmented, shuffled training batches (per-epoch permutation, ``set_epoch``).
        test: yields every test sample exactly once, in order, without augmentation.
        num_classes: number of classes.
        classes: class names.
        image_size: input side length.
        mean, std: the normalization statistics applied.
        num_train: size of the training set (the range of ``Batch.index``).
        train_targets: ``[num_train]`` int64 CPU tensor, the label of every training sample by ``Batch.index``
            (CRD's other-class negatives need them before the first epoch has shown every sample).
    """

    train: Any
    test: Any
    num_classes: int
    classes: list[str]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_train: int
    train_targets: torch.Tensor | None = None


def balanced_subset(labels: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` samples with classes as balanced as possible (each class gets ⌊n/K⌋ or one more), drawn at
    random with a fixed ``seed`` and returned in dataset order; all indices when ``n`` is ``None`` or too large.

    The seed is fixed rather than the run's seed so that every run of a comparison sees the same subset.
    """
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))  # position of each sample within its class's random order
    chosen = order[np.lexsort((np.arange(len(order)), rank[order]))[:n]]
    return np.sort(chosen)


def _array_bundle(
    data: ArrayData,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    *,
    batch_size: int,
    eval_batch_size: int,
    augment_train: bool,
    train_subset: int | None,
    test_subset: int | None,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
    channels_last: bool,
    views: JDAPolicy | None,
    negatives: bool,
    replay_views: int = 0,
) -> DataBundle:
    tr = balanced_subset(data.train_labels, train_subset)
    te = balanced_subset(data.test_labels, test_subset)
    common = {"mean": mean, "std": std, "device": device, "rank": rank, "world_size": world_size}
    train = TensorLoader(
        torch.from_numpy(np.ascontiguousarray(data.train_images[tr])),
        torch.from_numpy(data.train_labels[tr]),
        batch_size,
        train=True,
        augment=augment_train,
        seed=seed,
        channels_last=channels_last,
        views=views,
        negatives=negatives,
        replay_views=replay_views,
        **common,
    )
    test = TensorLoader(
        torch.from_numpy(np.ascontiguousarray(data.test_images[te])),
        torch.from_numpy(data.test_labels[te]),
        eval_batch_size,
        train=False,
        channels_last=channels_last,
        **common,
    )
    targets = torch.from_numpy(np.asarray(data.train_labels)[tr].astype(np.int64))
    return DataBundle(
        train, test, len(data.classes), list(data.classes), data.train_images.shape[-1], mean, std, len(tr), targets
    )


@functools.lru_cache(maxsize=2)
def _embedded_arrays() -> ArrayData:
    with resources.as_file(resources.files("kdforge.data") / "assets" / EMBEDDED_ASSET) as path:
        return load_jpeg_npz(path)


@DATASETS.register(
    "embedded", kind="packaged", num_classes=10, image_size=32,
    description="10,000/2,000-image CIFAR-10 subset shipped in the package (no download)",
)  # fmt: skip
def _embedded(root: str | None, download: bool) -> tuple[ArrayData, tuple, tuple]:
    return _embedded_arrays(), aug.CIFAR10_MEAN, aug.CIFAR10_STD


@DATASETS.register(
    "cifar10", kind="archive", num_classes=10, image_size=32,
    description="CIFAR-10 python archive in data.root (data.download=true fetches it)",
)  # fmt: skip
def _cifar10(root: str | None, download: bool) -> tuple[ArrayData, tuple, tuple]:
    return load_cifar(CIFAR10, root, download_missing=download), aug.CIFAR10_MEAN, aug.CIFAR10_STD


@DATASETS.register(
    "cifar100", kind="archive", num_classes=100, image_size=32,
    description="CIFAR-100 python archive in data.root (data.download=true fetches it)",
)  # fmt: skip
def _cifar100(root: str | None, download: bool) -> tuple[ArrayData, tuple, tuple]:
    return load_cifar(CIFAR100, root, download_missing=download), aug.CIFAR100_MEAN, aug.CIFAR100_STD


@DATASETS.register(
    "cifar10_jpeg", kind="npz", num_classes=10, image_size=32,
    description="CIFAR-10 in the JPEG .npz format; data.root = the file or its folder",
)  # fmt: skip
def _cifar10_jpeg(root: str | None, download: bool) -> tuple[ArrayData, tuple, tuple]:
    if root is None:
        raise DataError("cifar10_jpeg needs data.root: the JPEG .npz file or the folder holding it")
    return load_jpeg_npz(root), aug.CIFAR10_MEAN, aug.CIFAR10_STD


@DATASETS.register(
    "cifar10_scenes", kind="synthetic", num_classes=10, image_size=96,
    description="no download: 96x96 scenes, a small CIFAR-10 object among distractors (DATS); root as cifar10_seg",
)  # fmt: skip
def _cifar10_scenes(root: str | None, download: bool) -> tuple[ArrayData, tuple, tuple]:
    # The scenes are the same for every run (seeds 0 and 1): 5,000 from training images, 1,000 from test images. They
    # are cached (KDFORGE_CACHE) because building them costs tens of seconds on a CPU.
    src = cifar10_source(root, download)
    key = hashlib.sha256(
        b"scenes-v1" + src.train_images[:64].tobytes() + src.test_images[:64].tobytes()
        + np.array([len(src.train_images), len(src.test_images)]).tobytes()
    ).hexdigest()[:16]  # fmt: skip
    cached = cache_dir() / f"cifar10_scenes_{key}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        train = make_scenes(src.train_images, src.train_labels, min(5000, len(src.train_images)), seed=0)
        test = make_scenes(src.test_images, src.test_labels, min(1000, len(src.test_images)), seed=1)
        arrays = {"xtr": train.images, "ytr": train.labels, "xte": test.images, "yte": test.labels}
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(cached)
        except OSError:
            pass  # a read-only cache only costs the rebuild next time
    data = ArrayData(arrays["xtr"], arrays["ytr"], arrays["xte"], arrays["yte"], list(src.classes))
    return data, aug.CIFAR10_MEAN, aug.CIFAR10_STD


@DATASETS.register(
    "folder", kind="folder", num_classes=None, image_size=224,
    description="your images: data.root/train/<class>/*.jpg and data.root/val/<class>/*.jpg",
)  # fmt: skip
def _folder(root: str | None, download: bool) -> tuple[str, tuple, tuple]:
    return "folder", aug.IMAGENET_MEAN, aug.IMAGENET_STD


@DATASETS.register(
    "imagenet", kind="folder", num_classes=1000, image_size=224,
    description="ImageNet-1k as image folders: data.root/train/<wnid>/ and data.root/val/<wnid>/",
)  # fmt: skip
def _imagenet(root: str | None, download: bool) -> tuple[str, tuple, tuple]:
    return "folder", aug.IMAGENET_MEAN, aug.IMAGENET_STD


def _folder_bundle(
    name: str,
    root: str | None,
    mean: tuple,
    std: tuple,
    *,
    image_size: int,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    train_subset: int | None,
    test_subset: int | None,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
    channels_last: bool,
    views: JDAPolicy | None,
    negatives: bool,
    bad_images: Literal["fail", "skip"] = "fail",
) -> DataBundle:
    if root is None:
        raise DataError(f"dataset '{name}' needs data.root: a folder with train/<class>/ and val/<class>/")
    base = Path(root)
    train_samples, classes = scan_folder(base / "train")
    test_samples, _ = scan_folder(base / "val", classes)
    tr = balanced_subset(np.array([lbl for _, lbl in train_samples]), train_subset)
    te = balanced_subset(np.array([lbl for _, lbl in test_samples]), test_subset)
    train_samples = [train_samples[i] for i in tr]
    test_samples = [test_samples[i] for i in te]
    # Small user images (e.g. 32 px) should not be cropped to 8% of their area; ImageNet keeps torchvision's range.
    scale = (0.08, 1.0) if name == "imagenet" else (0.35, 1.0)
    common = {"mean": mean, "std": std, "device": device, "num_workers": num_workers, "rank": rank}
    common["bad_images"] = bad_images
    common |= {"world_size": world_size, "channels_last": channels_last, "seed": seed}
    train = FolderLoader(
        ImageFolderDataset(train_samples, image_size, train=True, seed=seed, scale=scale),
        batch_size,
        train=True,
        views=views,
        negatives=negatives,
        **common,
    )
    test_set = ImageFolderDataset(test_samples, image_size, train=False)
    test = FolderLoader(test_set, eval_batch_size, train=False, **common)
    targets = torch.tensor([lbl for _, lbl in train_samples], dtype=torch.int64)
    return DataBundle(train, test, len(classes), classes, image_size, mean, std, len(train_samples), targets)


def build_data(
    name: str,
    *,
    root: str | None = None,
    download: bool = False,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    num_workers: int = 4,
    image_size: int | None = None,
    augment: bool = True,
    train_subset: int | None = None,
    test_subset: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    views: Literal["none", "jda"] = "none",
    jda_p: float = 0.3,
    jda_ops: list[str] | None = None,
    negatives: bool = False,
    bad_images: Literal["fail", "skip"] = "fail",
    replay_views: int = 0,
) -> DataBundle:
    """Build the train and test loaders of dataset ``name``.

    Args:
        name: a registered dataset (``kdforge datasets``).
        root: where its files are (archive folder, ``.npz`` file, or image-folder root).
        download: fetch missing CIFAR archives.
        batch_size, eval_batch_size: per-rank batch sizes for training and evaluation.
        num_workers: DataLoader workers (image folders; CIFAR-sized sets need none).
        image_size: input side for image folders (default 224); CIFAR-sized sets keep 32.
        augment: crop/flip training batches.
        train_subset, test_subset: use a fixed, class-balanced subset of that many samples.
        device: where batches are produced (CIFAR-sized sets are stored there whole).
        seed: shuffling and augmentation seed.
        rank, world_size: distributed shard.
        channels_last: channels-last inputs.
        views: ``jda`` adds a joint-data-augmentation view to every training batch (CCD).
        jda_p, jda_ops: JDA probability and operation list (``name:magnitude``; default the CIFAR-100 list).
        negatives: every training batch also carries one other-class training sample per anchor
            (``Batch.negative``, for methods with ``needs_negatives``: triplet KD, AMKD). ``fit`` switches it on
            by itself (``bundle.train.negatives = True``) when the method needs it.
        bad_images: image folders only: ``fail`` on an undecodable image (naming it) or ``skip`` it (dropped from
            its batch and counted in ``loader.skipped_images``).
        replay_views: in-memory datasets only: ``K > 0`` gives every training sample K fixed crop/flip views, one
            shown per epoch (``Batch.view_id``), so a frozen teacher's logits can be cached exactly; needs
            ``augment`` and ``views=none``. 0 (default) draws a fresh crop/flip every time.
    """
    builder = DATASETS.get(name)
    device = torch.device(device)
    policy = None
    if views == "jda":
        policy = JDAPolicy.parse(jda_ops, jda_p) if jda_ops is not None else JDAPolicy(p=jda_p)
    elif views != "none":
        raise DataError(f"data.views must be none or jda, got {views!r}")
    if replay_views < 0 or (replay_views and (not augment or views != "none")):
        raise DataError(
            f"data.replay_views={replay_views}: replayed crop/flip views need data.augment=true, data.views=none "
            "and a count >= 0"
        )
    if DATASETS.meta(name).get("kind") == "task":
        # A dataset of another task builds its own loaders (targets, joint augmentation) from the same keys.
        request = DataRequest(
            root, download, batch_size, eval_batch_size, image_size, augment, train_subset, test_subset, device, seed,
            rank, world_size,
        )  # fmt: skip
        bundle = builder(request)
        if len(bundle.train) == 0:
            raise DataError(
                f"{bundle.num_train} training samples give no full batch of {batch_size} per rank; lower "
                "data.batch_size"
            )
        return bundle
    source, mean, std = builder(root, download)
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "train_subset": train_subset,
        "test_subset": test_subset,
        "device": device,
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "channels_last": channels_last,
        "views": policy,
        "negatives": negatives,
    }
    if isinstance(source, ArrayData):
        if image_size not in (None, source.train_images.shape[-1]):
            raise DataError(f"dataset '{name}' has {source.train_images.shape[-1]} px images; remove data.image_size")
        bundle = _array_bundle(source, mean, std, augment_train=augment, replay_views=replay_views, **common)
    else:
        if replay_views:
            raise DataError(f"data.replay_views needs an in-memory dataset (embedded, cifar*), not '{name}'")
        size = image_size or DATASETS.meta(name)["image_size"]
        bundle = _folder_bundle(
            name, root, mean, std, image_size=size, num_workers=num_workers, bad_images=bad_images, **common
        )
        if not augment:
            bundle.train.dataset.train = False  # deterministic resize + centre crop for the training split too
    if len(bundle.train) == 0:
        raise DataError(
            f"{bundle.num_train} training samples give no full batch of {batch_size} per rank; lower data.batch_size"
        )
    return bundle


def cifar10_source(root: str | None, download: bool = False) -> ArrayData:
    """The CIFAR-10 images the no-download task datasets are made from: the embedded subset without ``root``, the
    JPEG ``.npz`` when ``root`` is that file or a folder holding ``cifar10_jpeg.npz``, else the official archive."""
    if root is None:
        return _embedded_arrays()
    path = Path(root)
    if path.suffix == ".npz" or (path / "cifar10_jpeg.npz").is_file():
        return load_jpeg_npz(path if path.suffix == ".npz" else path / "cifar10_jpeg.npz")
    return load_cifar(CIFAR10, root, download_missing=download)


def list_datasets() -> list[str]:
    """Registered dataset names."""
    return DATASETS.names()


__all__ = ["Batch", "DataBundle", "DataRequest", "balanced_subset", "build_data", "list_datasets"]


# Datasets of the other tasks register themselves when their modules are imported (after DataBundle exists).
from kdforge.data import detection as _detection  # noqa: E402, F401
from kdforge.data import hashing as _hashing  # noqa: E402, F401
from kdforge.data import lowlight as _lowlight  # noqa: E402, F401
from kdforge.data import oriented as _oriented  # noqa: E402, F401
from kdforge.data import segmentation as _segmentation  # noqa: E402, F401

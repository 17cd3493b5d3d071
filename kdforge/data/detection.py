"""COCO-format detection data: ``instances_<split>.json`` plus an image folder, validated up front.

Layout (COCO 2017): ``root/annotations/instances_<split>.json`` and images in ``root/<split>/<file_name>``; or any
annotation file and image folder given explicitly. Category ids (any integers) map to contiguous labels
``0 .. K-1`` in ascending id order; boxes go from COCO ``[x, y, w, h]`` to xyxy pixels.

Every problem is one :class:`kdforge.errors.DataError` line naming the file, image or annotation and the fix:

- malformed JSON, or missing ``images`` / ``annotations`` / ``categories`` / per-entry keys;
- an annotation whose category id is not in ``categories``, or whose image id is not in ``images``;
- a box with non-positive width or height, or reaching outside its image by more than ``box_tolerance`` pixels
  (default 1 px, for the rounding of real annotations; boxes within the tolerance are clipped to the image);
- an image without annotations when ``empty_images="error"`` (``"keep"``, the default, keeps it as a background
  image with no boxes; ``"skip"`` leaves it out);
- a missing image file (checked at construction) or one that does not decode or whose size differs from the JSON
  (checked when the image is read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from kdforge.data import DataBundle, DataRequest, cifar10_source
from kdforge.data.augment import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from kdforge.data.dense_loader import DenseTensorLoader, JointAugment
from kdforge.data.synth.detection import augment_detection, make_detection_splits
from kdforge.errors import DataError
from kdforge.registry import DATASETS

EmptyPolicy = Literal["keep", "skip", "error"]


@dataclass(frozen=True)
class CocoImage:
    """One image's entry: file, size and annotations (boxes xyxy float32 ``[G, 4]``, labels, crowd, areas)."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray


def _require(entry: dict, keys: tuple[str, ...], what: str, where: Path) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataError(f"{where}: {what} lacks {missing[0]!r}; every COCO {what} needs {', '.join(keys)}")


class CocoDetection(Dataset):
    """A COCO-format detection split.

    ``dataset[i]`` is ``(image, target)``: uint8 ``[3, H, W]`` and a dict of ``boxes [G, 4]`` (xyxy), ``labels
    [G]``, ``iscrowd [G]``, ``areas [G]`` and ``image_id`` (the index ``i``, the order the evaluator scores in).
    :func:`collate_detection` pads a list of them into a batch.

    Args:
        annotation_file: the ``instances_*.json``.
        image_dir: folder the ``file_name`` entries are relative to.
        empty_images: ``"keep"`` (background images), ``"skip"`` or ``"error"``.
        box_tolerance: how far (pixels) a box may reach outside its image before it is an error.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        empty_images: EmptyPolicy = "keep",
        box_tolerance: float = 1.0,
    ) -> None:
        ann_path = Path(annotation_file)
        self.image_dir = Path(image_dir)
        if empty_images not in ("keep", "skip", "error"):
            raise DataError(f"empty_images must be 'keep', 'skip' or 'error', got {empty_images!r}")
        if not ann_path.is_file():
            raise DataError(f"annotation file {ann_path} does not exist; give the instances_<split>.json path")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist; give the folder holding the images")
        try:
            data = json.loads(ann_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{ann_path} is not valid JSON ({err}); re-export the COCO annotation file") from None
        if not isinstance(data, dict):
            raise DataError(f"{ann_path} must hold a JSON object with images, annotations and categories")
        _require(data, ("images", "annotations", "categories"), "annotation file", ann_path)

        cat_ids = []
        names = {}
        for cat in data["categories"]:
            _require(cat, ("id", "name"), "category", ann_path)
            cat_ids.append(int(cat["id"]))
            names[int(cat["id"])] = str(cat["name"])
        cat_ids.sort()
        self.category_ids = cat_ids
        self.classes = [names[c] for c in cat_ids]
        label_of = {c: i for i, c in enumerate(cat_ids)}

        images: dict[int, dict] = {}
        for img in data["images"]:
            _require(img, ("id", "file_name", "width", "height"), "image", ann_path)
            images[int(img["id"])] = img
        per_image: dict[int, list[dict]] = {i: [] for i in images}
        for ann in data["annotations"]:
            _require(ann, ("id", "image_id", "category_id", "bbox"), "annotation", ann_path)
            if int(ann["category_id"]) not in label_of:
                raise DataError(
                    f"{ann_path}: annotation {ann['id']} has category_id {ann['category_id']}, which is not in "
                    f"categories (ids {cat_ids[:10]}); fix the annotation or add the category"
                )
            if int(ann["image_id"]) not in per_image:
                raise DataError(
                    f"{ann_path}: annotation {ann['id']} refers to image_id {ann['image_id']}, not in images"
                )
            per_image[int(ann["image_id"])].append(ann)

        self.entries: list[CocoImage] = []
        for image_id in sorted(images):
            img, anns = images[image_id], per_image[image_id]
            if not anns and empty_images == "error":
                raise DataError(
                    f"{ann_path}: image {image_id} ({img['file_name']}) has no annotations; remove it or load with "
                    "empty_images='keep' (background image) or 'skip'"
                )
            if not anns and empty_images == "skip":
                continue
            w, h = int(img["width"]), int(img["height"])
            boxes = np.zeros((len(anns), 4), dtype=np.float32)
            for j, ann in enumerate(anns):
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                if bw <= 0 or bh <= 0:
                    raise DataError(f"{ann_path}: annotation {ann['id']} has an empty box {ann['bbox']}; remove it")
                tol = box_tolerance
                if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
                    raise DataError(
                        f"{ann_path}: annotation {ann['id']} box [x, y, w, h] = {ann['bbox']} lies outside image "
                        f"{image_id} ({w}x{h}) by more than {tol} px; fix the box or the image size"
                    )
                boxes[j] = (max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h))
            path = self.image_dir / img["file_name"]
            if not path.is_file():
                raise DataError(f"image {path} (id {image_id}) listed in {ann_path} does not exist")
            self.entries.append(
                CocoImage(
                    image_id=image_id,
                    path=path,
                    width=w,
                    height=h,
                    boxes=boxes,
                    labels=np.array([label_of[int(a["category_id"])] for a in anns], dtype=np.int64),
                    iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
                    areas=np.array(
                        [
                            float(a.get("area", (b[2] - b[0]) * (b[3] - b[1])))
                            for a, b in zip(anns, boxes, strict=False)
                        ],
                        dtype=np.float32,
                    ),
                )
            )

    @classmethod
    def from_root(cls, root: str | Path, split: str, **kw: object) -> CocoDetection:
        """``root/annotations/instances_<split>.json`` with images in ``root/<split>/`` (COCO 2017 layout)."""
        root = Path(root)
        return cls(root / "annotations" / f"instances_{split}.json", root / split, **kw)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        e = self.entries[index]
        try:
            with Image.open(e.path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"image {e.path} (id {e.image_id}) cannot be decoded ({err}); replace the file") from None
        if arr.shape[:2] != (e.height, e.width):
            raise DataError(
                f"image {e.path} is {arr.shape[1]}x{arr.shape[0]} but the annotation file says {e.width}x{e.height}"
            )
        target = {
            "boxes": torch.from_numpy(e.boxes),
            "labels": torch.from_numpy(e.labels),
            "iscrowd": torch.from_numpy(e.iscrowd),
            "areas": torch.from_numpy(e.areas),
            "image_id": torch.tensor(index),
        }
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), target


def collate_detection(items: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, dict[str, Tensor]]:
    """Stacks same-size images and pads targets to the batch's most boxes (labels -1, the task's layout).

    Returns:
        ``(images [B, 3, H, W] uint8, {"boxes" [B, M, 4], "labels" [B, M], "iscrowd" [B, M], "areas" [B, M],
        "image_ids" [B]})``.
    """
    sizes = {tuple(img.shape) for img, _ in items}
    if len(sizes) > 1:
        raise DataError(f"a batch needs images of one size, got {sorted(sizes)}; resize them in the dataset first")
    b = len(items)
    m = max(1, max(len(t["labels"]) for _, t in items))
    boxes = torch.zeros(b, m, 4)
    labels = torch.full((b, m), -1, dtype=torch.long)
    crowd = torch.zeros(b, m, dtype=torch.bool)
    areas = torch.zeros(b, m)
    for i, (_, t) in enumerate(items):
        g = len(t["labels"])
        boxes[i, :g], labels[i, :g], crowd[i, :g], areas[i, :g] = t["boxes"], t["labels"], t["iscrowd"], t["areas"]
    images = torch.stack([img for img, _ in items])
    ids = torch.stack([t["image_id"] for _, t in items])
    return images, {"boxes": boxes, "labels": labels, "iscrowd": crowd, "areas": areas, "image_ids": ids}


def detection_augment(scale_range: tuple[float, float] = (0.75, 1.25), flip_p: float = 0.5) -> JointAugment:
    """The joint training augmentation of the detection datasets for :class:`DenseTensorLoader`: random flip and
    scale jitter + crop of images and boxes (:func:`kdforge.data.synth.detection.augment_detection`); other target
    entries (``image_ids``, ``iscrowd``) pass through, and a box the crop makes too small becomes padding."""

    def augment(x: Tensor, targets: dict[str, Tensor], g: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x, boxes, labels = augment_detection(
            x, targets["boxes"], targets["labels"], g, flip_p=flip_p, scale_range=scale_range
        )
        return x, {**targets, "boxes": boxes, "labels": labels}

    return augment


def letterbox(image: Tensor, size: int) -> tuple[Tensor, float]:
    """Resizes ``image`` (uint8 ``[3, H, W]``) so its longer side is ``size`` (bilinear, antialiased, aspect kept)
    and pads it at the right and bottom with zeros to ``size × size``.

    Returns:
        ``(uint8 [3, size, size], scale)``: a point ``(x, y)`` of the original is at ``(x·scale, y·scale)``.
    """
    _, h, w = image.shape
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    out = torch.zeros(3, size, size, dtype=torch.uint8)
    out[:, :nh, :nw] = resized[0].round().clamp(0, 255).to(torch.uint8)
    return out, scale


def letterbox_split(dataset: CocoDetection, size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Every image of ``dataset`` letterboxed to ``size`` (decoded and checked once) and padded targets.

    Returns:
        ``(images uint8 [N, 3, size, size], targets)`` with ``boxes [N, M, 4]`` scaled to the letterboxed image,
        ``orig_boxes [N, M, 4]`` in original pixels, ``labels [N, M]`` (-1 padding), ``iscrowd``, ``areas`` (COCO
        areas, original pixels), ``image_ids [N]`` (dataset index), ``scales [N]`` and ``sizes [N, 2]`` (original
        ``(H, W)``).
    """
    n = len(dataset)
    m = max([1] + [len(e.labels) for e in dataset.entries])
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    t = {
        "boxes": torch.zeros(n, m, 4),
        "orig_boxes": torch.zeros(n, m, 4),
        "labels": torch.full((n, m), -1, dtype=torch.long),
        "iscrowd": torch.zeros(n, m, dtype=torch.bool),
        "areas": torch.zeros(n, m),
        "image_ids": torch.arange(n),
        "scales": torch.zeros(n),
        "sizes": torch.zeros(n, 2, dtype=torch.long),
    }
    for i in range(n):
        image, target = dataset[i]
        images[i], scale = letterbox(image, size)
        g = len(target["labels"])
        t["boxes"][i, :g] = target["boxes"] * scale
        t["orig_boxes"][i, :g] = target["boxes"]
        t["labels"][i, :g] = target["labels"]
        t["iscrowd"][i, :g] = target["iscrowd"]
        t["areas"][i, :g] = target["areas"]
        t["scales"][i] = scale
        t["sizes"][i] = torch.tensor(image.shape[1:])
    return images, t


def _subset(images: Tensor, targets: dict[str, Tensor], count: int | None) -> tuple[Tensor, dict[str, Tensor]]:
    if count is None or count >= len(images):
        return images, targets
    sub = {k: v[:count] for k, v in targets.items()}
    return images[:count], sub


@DATASETS.register(
    "cifar10_det", kind="task", task="detection", num_classes=10, image_size=96,
    description="no download: 1-4 CIFAR-10 objects (16-48 px) pasted on 96x96 canvases, boxes and 10 classes",
)  # fmt: skip
def _cifar10_det(req: DataRequest) -> DataBundle:
    """Canvases (:func:`kdforge.data.synth.detection.make_detection_splits`, dataset seed 0, the same for every
    run) from the embedded CIFAR-10 subset (``data.root`` unset) or the full set (``data.root`` = the JPEG ``.npz``
    or the archive folder). ``data.train_subset``/``test_subset`` are the canvas counts (default 5,000 / 1,000),
    ``data.image_size`` the canvas side (a multiple of 16, default 96). Targets: ``boxes``, ``labels`` (padded to 4
    rows) and ``image_ids``; training batches get the joint flip + scale jitter (:func:`detection_augment`)."""
    size = req.image_size or 96
    if size % 16 != 0:
        raise DataError(
            f"cifar10_det needs data.image_size a multiple of 16 (the detectors' largest stride), got {size}"
        )
    src = cifar10_source(req.root, req.download)
    train, test = make_detection_splits(
        src.train_images, src.train_labels, src.test_images, src.test_labels,
        num_train=req.train_subset or 5000, num_test=req.test_subset or 1000, seed=0, canvas_size=size,
    )  # fmt: skip

    def targets(c) -> dict[str, Tensor]:
        return {
            "boxes": torch.from_numpy(c.boxes),
            "labels": torch.from_numpy(c.labels),
            "image_ids": torch.arange(len(c.images)),
        }

    common = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, **req.shard()}
    train_loader = DenseTensorLoader(
        torch.from_numpy(train.images), targets(train), req.batch_size, train=True, seed=req.seed,
        augment=detection_augment() if req.augment else None, **common,
    )  # fmt: skip
    test_loader = DenseTensorLoader(
        torch.from_numpy(test.images), targets(test), req.eval_batch_size, train=False, **common
    )
    classes = list(getattr(src, "classes", [str(k) for k in range(10)]))
    return DataBundle(train_loader, test_loader, 10, classes, size, CIFAR10_MEAN, CIFAR10_STD, len(train.images))


@DATASETS.register(
    "coco_det", kind="task", task="detection", num_classes=None, image_size=320,
    description="your boxes: COCO-format annotations/instances_{train,val}.json and image folders train/, val/ in "
    "data.root",
)  # fmt: skip
def _coco_det(req: DataRequest) -> DataBundle:
    """A COCO 2017 layout in ``data.root`` (``annotations/instances_train.json`` + ``train/``, and ``val``).

    Every image is letterboxed once (:func:`letterbox`: longer side to ``data.image_size``, a multiple of 16,
    default 320; zero padding right and bottom) and held in memory. Training boxes are scaled by the same factor
    and get the joint flip + scale jitter. Evaluation runs on the letterboxed images, and its targets carry the
    original boxes, COCO areas, crowd flags, each image's ``scales`` and original ``sizes``: the evaluator divides
    the detections by the scale and clips them to the original image, so AP is computed in original image
    coordinates (areas for APs/APm/APl are COCO's). ``data.train_subset``/``test_subset`` keep the first images by
    id. Normalised with the ImageNet statistics.
    """
    if req.root is None:
        raise DataError("dataset 'coco_det' needs data.root: a folder with annotations/instances_train.json, "
                        "annotations/instances_val.json and the image folders train/ and val/")  # fmt: skip
    size = req.image_size or 320
    if size % 16 != 0:
        raise DataError(f"coco_det needs data.image_size a multiple of 16 (the detectors' largest stride), got {size}")
    train_set = CocoDetection.from_root(req.root, "train")
    test_set = CocoDetection.from_root(req.root, "val")
    if train_set.category_ids != test_set.category_ids:
        raise DataError(
            f"{req.root}: train and val annotation files list different categories ({train_set.category_ids[:10]} vs "
            f"{test_set.category_ids[:10]}); both splits need the same categories"
        )
    train_images, train_t = _subset(*letterbox_split(train_set, size), req.train_subset)
    test_images, test_t = _subset(*letterbox_split(test_set, size), req.test_subset)
    train_t = {k: train_t[k] for k in ("boxes", "labels", "iscrowd", "image_ids")}
    test_t = {**test_t, "boxes": test_t.pop("orig_boxes")}
    common = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **req.shard()}
    train_loader = DenseTensorLoader(
        train_images, train_t, req.batch_size, train=True, seed=req.seed,
        augment=detection_augment() if req.augment else None, **common,
    )  # fmt: skip
    test_loader = DenseTensorLoader(test_images, test_t, req.eval_batch_size, train=False, **common)
    return DataBundle(
        train_loader, test_loader, len(train_set.classes), train_set.classes, size, IMAGENET_MEAN, IMAGENET_STD,
        len(train_images),
    )  # fmt: skip


__all__ = ["CocoDetection", "CocoImage", "collate_detection", "detection_augment", "letterbox", "letterbox_split"]

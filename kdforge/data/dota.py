"""DOTA-format oriented-detection data: images plus one label text file per image (docs/tasks/oriented.md §4).

Layout (DOTA's own, and what DOTA_devkit's ``ImgSplit`` writes)::

    root/images/P0001.png        any of .png .jpg .jpeg .tif .tiff .bmp
    root/labelTxt/P0001.txt      same stem

A label file holds optional header lines ``imagesource:…`` and ``gsd:…`` (skipped), blank lines (skipped), and one
object per line: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult`` (whitespace-separated; ``difficult`` is ``0`` or ``1``
and may be left out, meaning 0, as DOTA_devkit's ``parse_gt`` reads it). The polygon becomes an le90 rotated box by
:func:`kdforge.ops.rotated.poly_to_rbox` (its minimum-area rectangle, the rule of mmrotate's
``poly2obb_np_le90``); degenerate polygons are kept (a zero-height box), not dropped.

Class names map to ids by their position in ``classes`` when given (a name outside it is an error); otherwise the
names found in all label files, sorted alphabetically, are the classes. ``DOTA_V1_CLASSES`` / ``DOTA_V15_CLASSES``
are the official lists in the devkit's order.

Images are decoded lazily in ``__getitem__`` (full DOTA images reach 20000 px a side: split them first, e.g. with the
devkit's ``ImgSplit`` into 1024 × 1024 patches); label files are parsed up front so that every annotation error is
reported when the dataset is opened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdforge.errors import DataError
from kdforge.ops.rotated import poly_to_rbox

DOTA_V1_CLASSES: tuple[str, ...] = (
    "plane",
    "baseball-diamond",
    "bridge",
    "ground-track-field",
    "small-vehicle",
    "large-vehicle",
    "ship",
    "tennis-court",
    "basketball-court",
    "storage-tank",
    "soccer-ball-field",
    "roundabout",
    "harbor",
    "swimming-pool",
    "helicopter",
)
DOTA_V15_CLASSES: tuple[str, ...] = (*DOTA_V1_CLASSES, "container-crane")

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_HEADERS = ("imagesource:", "gsd:")


@dataclass(frozen=True)
class DotaLabels:
    """The raw objects of one label file: ``polygons`` float64 ``[K, 4, 2]``, class ``names``, ``difficult``
    ``[K]`` bool and the 1-based ``lines`` they come from."""

    polygons: np.ndarray
    names: list[str]
    difficult: np.ndarray
    lines: list[int]


def parse_dota_labels(path: str | Path) -> DotaLabels:
    """Read one DOTA label file.

    Args:
        path: the ``.txt`` file.

    Returns:
        Its objects, in file order.

    Raises:
        DataError: naming the file and line of a malformed object line (field count, a coordinate that is not a
            finite number, ``difficult`` not 0/1), or an unreadable file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read DOTA label file {path} ({err})") from None
    polys: list[list[float]] = []
    names: list[str] = []
    difficult: list[bool] = []
    lines: list[int] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.lower().startswith(_HEADERS):
            continue
        fields = line.split()
        where = f"{path}:{lineno}"
        if len(fields) not in (9, 10):
            raise DataError(
                f"{where}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class difficult' (10 fields, or 9 without difficult), "
                f"got {len(fields)} fields"
            )
        try:
            coords = [float(v) for v in fields[:8]]
        except ValueError:
            raise DataError(f"{where}: the first 8 fields must be numbers (polygon x/y), got {fields[:8]}") from None
        if not all(math.isfinite(c) for c in coords):
            raise DataError(f"{where}: polygon coordinates must be finite, got {fields[:8]}")
        flag = fields[9] if len(fields) == 10 else "0"
        if flag not in ("0", "1"):
            raise DataError(f"{where}: difficult must be 0 or 1, got {flag!r}")
        polys.append(coords)
        names.append(fields[8])
        difficult.append(flag == "1")
        lines.append(lineno)
    return DotaLabels(
        polygons=np.asarray(polys, dtype=np.float64).reshape(-1, 4, 2),
        names=names,
        difficult=np.asarray(difficult, dtype=bool),
        lines=lines,
    )


@dataclass(frozen=True)
class DotaAnnotation:
    """One image's targets: ``rboxes`` float32 ``[K, 5]`` le90, ``labels`` int64 ``[K]``, ``difficult`` bool
    ``[K]``, ``polygons`` float32 ``[K, 4, 2]`` as annotated."""

    rboxes: Tensor
    labels: Tensor
    difficult: Tensor
    polygons: Tensor


def _pair_files(image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    for d, what in ((image_dir, "image"), (label_dir, "label")):
        if not d.is_dir():
            raise DataError(f"DOTA {what} folder {d} does not exist; expected root/images and root/labelTxt")
    images: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in images:
                raise DataError(f"two images share the name {p.stem}: {images[p.stem]} and {p}; keep one")
            images[p.stem] = p
    labels = {p.stem: p for p in sorted(label_dir.iterdir()) if p.is_file() and p.suffix.lower() == ".txt"}
    for stem, p in images.items():
        if stem not in labels:
            raise DataError(f"image {p} has no label file {label_dir / (stem + '.txt')}; add it (it may be empty)")
    for stem, p in labels.items():
        if stem not in images:
            raise DataError(f"label file {p} has no image {stem}.* ({'/'.join(IMAGE_SUFFIXES)}) in {image_dir}")
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return [(images[s], labels[s]) for s in sorted(images)]


class DotaDataset:
    """A DOTA-format split (module docstring): ``ds[i]`` is ``(image uint8 [3, H, W], targets)`` with ``targets``
    a dict of ``rboxes`` ``[K, 5]`` (le90, pixels), ``labels`` ``[K]``, ``difficult`` ``[K]``, ``polygons``
    ``[K, 4, 2]``.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        images_dir: str = "images",
        labels_dir: str = "labelTxt",
    ) -> None:
        """Args:
        root: the split's folder.
        classes: class names in id order; ``None`` = the sorted names found in the label files.
        images_dir, labels_dir: sub-folders of ``root``.
        """
        root = Path(root)
        self.files = _pair_files(root / images_dir, root / labels_dir)
        parsed = [parse_dota_labels(lbl) for _, lbl in self.files]
        if classes is None:
            classes = sorted({n for p in parsed for n in p.names})
        elif len(set(classes)) != len(classes):
            raise DataError(f"the DOTA class list has duplicate names: {list(classes)}")
        self.classes: list[str] = list(classes)
        index = {n: i for i, n in enumerate(self.classes)}
        self.annotations: list[DotaAnnotation] = []
        for (_, lbl), p in zip(self.files, parsed, strict=True):
            for name, lineno in zip(p.names, p.lines, strict=True):
                if name not in index:
                    raise DataError(
                        f"{lbl}:{lineno}: unknown class {name!r}; the given classes are {self.classes} "
                        "(add it to the list or leave the list out to discover the classes)"
                    )
            polys = torch.from_numpy(p.polygons)
            self.annotations.append(
                DotaAnnotation(
                    rboxes=poly_to_rbox(polys).to(torch.float32),
                    labels=torch.tensor([index[n] for n in p.names], dtype=torch.long),
                    difficult=torch.from_numpy(p.difficult),
                    polygons=polys.to(torch.float32),
                )
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i][0]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"cannot decode DOTA image {path} ({err})") from None
        a = self.annotations[i]
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        return image, {"rboxes": a.rboxes, "labels": a.labels, "difficult": a.difficult, "polygons": a.polygons}


def collate_dota(samples: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, dict[str, Tensor]]:
    """Stack equally sized images and pad targets to the batch format of the oriented task.

    Args:
        samples: ``(image [3, H, W], targets)`` pairs from :class:`DotaDataset` (images of one size, e.g. the
            devkit's ``ImgSplit`` patches).

    Returns:
        ``images`` uint8 ``[B, 3, H, W]`` and ``{"rboxes": [B, M, 5], "labels": [B, M] (-1 = padding),
        "difficult": [B, M]}`` with ``M`` the largest object count (at least 1).
    """
    sizes = {tuple(img.shape) for img, _ in samples}
    if len(sizes) != 1:
        raise DataError(f"cannot stack DOTA images of different sizes {sorted(sizes)}; split or resize them first")
    m = max(1, *(int(t["labels"].numel()) for _, t in samples))
    b = len(samples)
    rboxes = torch.zeros(b, m, 5)
    labels = torch.full((b, m), -1, dtype=torch.long)
    difficult = torch.zeros(b, m, dtype=torch.bool)
    for i, (_, t) in enumerate(samples):
        k = int(t["labels"].numel())
        rboxes[i, :k], labels[i, :k], difficult[i, :k] = t["rboxes"], t["labels"], t["difficult"]
    images = torch.stack([img for img, _ in samples])
    return images, {"rboxes": rboxes, "labels": labels, "difficult": difficult}


__all__ = [
    "DOTA_V1_CLASSES",
    "DOTA_V15_CLASSES",
    "IMAGE_SUFFIXES",
    "DotaAnnotation",
    "DotaDataset",
    "DotaLabels",
    "collate_dota",
    "parse_dota_labels",
]

"""Segmentation data: VOC and Cityscapes folders, the CIFAR-10 canvases and joint image + mask augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data.dense_augment import ScaleCropFlip, random_scale_crop_flip, warp_images, warp_masks
from kdforge.data.segmentation import VOC_CLASSES, SegmentationFolder, SegTensors, pad_collate
from kdforge.data.synth.segmentation import (
    SEG_CLASSES,
    cifar_segmentation_splits,
    ellipse_mask,
    make_segmentation_canvases,
    polygon_vertices,
    rasterize_polygon,
)
from kdforge.errors import DataError

# ------------------------------------------------------------------------------------------------ VOC folders


def _palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])  # colours unrelated to the index
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _rgb(path: Path, h: int, w: int, seed: int, fmt: str | None = None) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def _voc(root: Path, masks: dict[str, np.ndarray], splits: dict[str, list[str]]) -> Path:
    for name, mask in masks.items():
        _rgb(root / "JPEGImages" / f"{name}.jpg", *mask.shape, seed=len(name))
        _palette_png(root / "SegmentationClass" / f"{name}.png", mask)
    for split, names in splits.items():
        f = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(n + "\n" for n in names))
    return root


def test_voc_folder_reads_palette_indices(tmp_path: Path) -> None:
    m1 = np.array([[0, 1, 255], [20, 0, 0]])
    m2 = np.full((4, 5), 7)
    root = _voc(tmp_path, {"a": m1, "b": m2}, {"train": ["b", "a"], "val": ["a"]})
    ds = SegmentationFolder(root, "train")
    assert ds.layout == "voc" and len(ds) == 2 and ds.num_classes == 21 and ds.classes == VOC_CLASSES
    img, mask = ds[1]
    assert img.shape == (3, 2, 3) and img.dtype == np.uint8
    assert mask.dtype == np.int64 and mask.tolist() == m1.tolist()  # palette index, not colour; 255 kept
    assert ds[0][1].tolist() == m2.tolist()
    assert len(SegmentationFolder(root, "val", layout="voc")) == 1


def test_voc_class_names_file(tmp_path: Path) -> None:
    root = _voc(tmp_path, {"a": np.array([[0, 2]])}, {"train": ["a"]})
    names = tmp_path / "names.txt"
    names.write_text("bg\nfoo\n\nbar\n")
    ds = SegmentationFolder(root, "train", num_classes=3, class_names_file=names)
    assert ds.classes == ["bg", "foo", "bar"]
    with pytest.raises(DataError, match="lists 3 names for 4 classes"):
        SegmentationFolder(root, "train", num_classes=4, class_names_file=names)


def test_voc_errors(tmp_path: Path) -> None:
    root = _voc(tmp_path / "v", {"a": np.array([[0, 30]]), "b": np.zeros((2, 2))}, {"train": ["a"], "val": []})
    with pytest.raises(DataError, match=r"label value\(s\) \[30\].*0\.\.20") as err:
        SegmentationFolder(root, "train")[0]
    assert "\n" not in str(err.value)
    SegmentationFolder(root, "train", num_classes=31)[0]  # fine once the label space is big enough
    with pytest.raises(DataError, match="split 'val'.*no samples"):
        SegmentationFolder(root, "val")
    with pytest.raises(DataError, match="test.txt"):
        SegmentationFolder(root, "test")
    # A mask whose size differs from its image.
    _palette_png(root / "SegmentationClass" / "b.png", np.zeros((3, 2)))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("b\n")
    with pytest.raises(DataError, match="mask .*b.png is 2x3 but its image .*b.jpg is 2x2"):
        SegmentationFolder(root, "train")[0]
    # An RGB colour mask instead of an index mask.
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "SegmentationClass" / "b.png")
    with pytest.raises(DataError, match="RGB image; label masks must be palette or grayscale"):
        SegmentationFolder(root, "train")[0]
    # A listed sample whose files are missing, and a root of neither layout.
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("zzz\n")
    with pytest.raises(DataError, match="zzz.jpg is listed"):
        SegmentationFolder(root, "train")
    with pytest.raises(DataError, match="neither a VOC root"):
        SegmentationFolder(tmp_path, "train")
    with pytest.raises(DataError, match="does not exist"):
        SegmentationFolder(tmp_path / "nope", "train")


# ----------------------------------------------------------------------------------------- Cityscapes folders


def _city(root: Path, split: str, city: str, stem: str, mask: np.ndarray) -> np.ndarray:
    img = _rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", *mask.shape, seed=len(stem))
    p = root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(p)
    return img


def test_cityscapes_folder(tmp_path: Path) -> None:
    m = np.array([[0, 18, 255], [5, 5, 5]])
    img = _city(tmp_path, "train", "zurich", "zurich_000001_000019", m)
    _city(tmp_path, "train", "aachen", "aachen_000000_000019", np.zeros((2, 3)))
    ds = SegmentationFolder(tmp_path, "train")
    assert ds.layout == "cityscapes" and ds.num_classes == 19 and len(ds) == 2 and ds.classes[0] == "road"
    got_img, got_mask = ds[1]  # sorted by city: aachen first
    assert got_mask.tolist() == m.tolist() and np.array_equal(got_img, img.transpose(2, 0, 1))
    _city(tmp_path, "val", "lindau", "lindau_000000_000019", np.array([[19]]))
    with pytest.raises(DataError, match=r"\[19\], outside 0\.\.18"):
        SegmentationFolder(tmp_path, "val")[0]
    (tmp_path / "leftImg8bit" / "test").mkdir()
    with pytest.raises(DataError, match="split 'test'.*no samples"):
        SegmentationFolder(tmp_path, "test")
    _rgb(tmp_path / "leftImg8bit" / "train" / "bonn" / "bonn_1_leftImg8bit.png", 2, 3, seed=0)
    with pytest.raises(DataError, match="createTrainIdLabelImgs"):
        SegmentationFolder(tmp_path, "train")


def test_pad_collate_pads_masks_with_ignore() -> None:
    a = (np.full((3, 2, 3), 9, np.uint8), np.ones((2, 3), np.int64))
    b = (np.full((3, 4, 1), 7, np.uint8), np.zeros((4, 1), np.int64))
    images, masks = pad_collate([a, b], size_divisor=4)
    assert images.shape == (2, 3, 4, 4) and masks.shape == (2, 4, 4)
    assert (masks[0, :2, :3] == 1).all() and (masks[0, 2:] == 255).all() and (masks[0, :, 3] == 255).all()
    assert (images[1, :, :, :1] == 7).all() and (images[1, :, :, 1:] == 0).all()


# ---------------------------------------------------------------------------------------- CIFAR-10 canvases


def _solid_sources(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` solid-colour 32×32 images; the colour encodes the class (red channel = 20·class + offset)."""
    labels = np.arange(n) % 10
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[..., 0] = (20 * labels + offset)[:, None, None]
    images[..., 1] = 200
    images[..., 2] = 13
    return images, labels


def test_canvases_are_deterministic_per_seed() -> None:
    images, labels = _solid_sources(20)
    images = images + np.random.default_rng(0).integers(0, 30, images.shape, dtype=np.uint8)
    a = make_segmentation_canvases(images, labels, 6, seed=1)
    b = make_segmentation_canvases(images, labels, 6, seed=1)
    c = make_segmentation_canvases(images, labels, 6, seed=2)
    assert a.images.tobytes() == b.images.tobytes() and a.masks.tobytes() == b.masks.tobytes()
    assert a.images.tobytes() != c.images.tobytes() and a.masks.tobytes() != c.masks.tobytes()
    chw = make_segmentation_canvases(images.transpose(0, 3, 1, 2).copy(), labels, 6, seed=1)
    assert chw.images.tobytes() == a.images.tobytes()  # [N, 3, 32, 32] sources give the same canvases


def test_canvas_labels_are_cifar_class_plus_one() -> None:
    images, labels = _solid_sources(30)
    out = make_segmentation_canvases(images, labels, 20, size=64, seed=0)
    assert out.images.shape == (20, 3, 64, 64) and out.masks.shape == (20, 64, 64)
    assert out.classes == SEG_CLASSES and len(out.classes) == 11 and out.classes[0] == "background"
    assert out.masks.max() <= 10
    for img, mask in zip(out.images, out.masks, strict=True):
        objects = np.unique(mask[mask > 0])
        assert 1 <= len(objects) <= 3 and (mask == 0).any()  # 1–3 objects (occlusion may hide one), background
        for cls in objects:  # every object pixel shows its own class's source colour
            assert (img[0][mask == cls] == 20 * (cls - 1)).all()
            assert (img[1][mask == cls] == 200).all()


def test_train_and_test_canvases_use_their_own_split() -> None:
    tr_images, tr_labels = _solid_sources(20, offset=0)
    te_images, te_labels = _solid_sources(20, offset=1)
    train, test = cifar_segmentation_splits(tr_images, tr_labels, te_images, te_labels, num_train=5, num_test=5)
    assert len(train.images) == 5 and len(test.images) == 5
    assert (train.images[:, 0][train.masks > 0] % 20 == 0).all()
    assert (test.images[:, 0][test.masks > 0] % 20 == 1).all()


def test_canvases_from_real_cifar_images() -> None:
    from kdforge.data import _embedded_arrays

    src = _embedded_arrays()
    out = make_segmentation_canvases(src.train_images[:200], src.train_labels[:200], 40, seed=0)
    fg = (out.masks > 0).mean()
    assert 0.2 < fg < 0.7  # neither mostly background nor mostly objects
    bg = out.images.transpose(0, 2, 3, 1)[out.masks == 0].astype(np.float32)
    assert bg.std(axis=0).mean() > 10  # the background is real-image texture, not a flat colour


def test_canvas_input_errors() -> None:
    images, labels = _solid_sources(4)
    with pytest.raises(DataError, match="uint8"):
        make_segmentation_canvases(images.astype(np.float32), labels, 2)
    with pytest.raises(DataError, match="0..9"):
        make_segmentation_canvases(images, labels + 7, 2)
    with pytest.raises(DataError, match="one label each"):
        make_segmentation_canvases(images, labels[:2], 2)


def test_polygon_raster_matches_shapely() -> None:
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import Point, Polygon

    rng = np.random.default_rng(0)
    for _ in range(5):
        vx, vy = polygon_vertices(40, rng)
        mask = rasterize_polygon(vx, vy, 40)
        poly = Polygon(list(zip(vx, vy, strict=True)))
        assert shapely.is_valid(poly)
        want = np.array([[poly.contains(Point(c + 0.5, r + 0.5)) for c in range(40)] for r in range(40)])
        assert (mask != want).sum() <= 2  # only pixel centres lying on an edge may differ
        assert abs(mask.sum() - poly.area) < poly.length  # pixel count ≈ area within a perimeter's width


def test_ellipse_mask_area() -> None:
    mask = ellipse_mask(64, np.random.default_rng(3))
    area = mask.sum()
    assert np.pi * (0.3 * 64) ** 2 * 0.9 < area < np.pi * (0.5 * 64) ** 2 * 1.05  # π·a·b, a, b ∈ [0.3, 0.5]·side


# ------------------------------------------------------------------------------------ joint augmentation


def _params(scale: float, ox: float, oy: float, flip: bool, b: int = 1, size: int = 8) -> ScaleCropFlip:
    return ScaleCropFlip(
        torch.full((b,), scale), torch.tensor([[ox, oy]] * b), torch.full((b,), flip), (size, size), (size, size)
    )


def _sample(b: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, size, size, generator=g), torch.randint(0, 200, (b, size, size), generator=g)


def test_identity_and_flip_are_exact() -> None:
    images, masks = _sample()
    for flip in (False, True):
        p = _params(1.0, 0.0, 0.0, flip, b=2)
        want_i, want_m = (images.flip(-1), masks.flip(-1)) if flip else (images, masks)
        assert torch.allclose(warp_images(images, p), want_i, atol=1e-6)
        assert torch.equal(warp_masks(masks, p), want_m)


def test_zoom_in_repeats_mask_pixels_nearest() -> None:
    _, masks = _sample()
    p = _params(2.0, 4.0, 2.0, False, b=2)  # output (u, v) shows input ((u + 4) / 2, (v + 2) / 2)
    want = masks[:, 1:5, 2:6].repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(warp_masks(masks, p), want)


def test_zoom_out_pads_masks_with_ignore_and_images_with_zero() -> None:
    images, masks = _sample()
    p = _params(0.5, -2.0, -4.0, False, b=2)  # the 4×4 shrunk image sits at x 2..6, y 4..8
    m = warp_masks(masks, p, ignore_index=255)
    assert (m[:, 4:8, 2:6] != 255).all() and (m == 255).sum() == 2 * (64 - 16)
    assert set(m[m != 255].tolist()) <= set(masks.unique().tolist())
    assert (warp_images(images, p)[:, :, :4] == 0).all()
    filled = warp_images(images, p, fill=0.5)
    assert torch.allclose(filled[:, :, :4], torch.full_like(filled[:, :, :4], 0.5))
    assert torch.allclose(filled[:, :, 5:7, 3:5], warp_images(images, p)[:, :, 5:7, 3:5], atol=1e-6)  # inside


def test_map_xy_follows_the_pixels() -> None:
    masks = torch.zeros(1, 16, 16, dtype=torch.long)
    masks[0, 5:8, 3:5] = 1  # a 2×3 box: x 3..5, y 5..8
    box = torch.tensor([[[3.0, 5.0], [5.0, 8.0]]])
    for flip in (False, True):
        p = ScaleCropFlip(torch.tensor([1.5]), torch.tensor([[1.0, 2.0]]), torch.tensor([flip]), (16, 16), (16, 16))
        ys, xs = torch.nonzero(warp_masks(masks, p)[0] == 1, as_tuple=True)
        corners = p.map_xy(box)[0]
        x0, x1 = corners[:, 0].min(), corners[:, 0].max()
        y0, y1 = corners[:, 1].min(), corners[:, 1].max()
        assert len(xs) > 0
        assert ((xs + 0.5 >= x0) & (xs + 0.5 <= x1) & (ys + 0.5 >= y0) & (ys + 0.5 <= y1)).all()


def test_random_scale_crop_flip_is_seeded_batched_and_nearest() -> None:
    images, masks = _sample(b=6, size=16)
    a = random_scale_crop_flip(images, masks, (12, 12), generator=torch.Generator().manual_seed(1))
    b = random_scale_crop_flip(images, masks, (12, 12), generator=torch.Generator().manual_seed(1))
    c = random_scale_crop_flip(images, masks, (12, 12), generator=torch.Generator().manual_seed(2))
    assert a[0].shape == (6, 3, 12, 12) and a[1].shape == (6, 12, 12) and a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    for i in range(6):  # nearest: every label is one of the sample's own labels (or padding)
        assert set(a[1][i].unique().tolist()) <= set(masks[i].unique().tolist()) | {255}
    with pytest.raises(ValueError, match="do not match"):
        random_scale_crop_flip(images, masks[:, :8])


def test_seg_tensors_batches() -> None:
    images, labels = _solid_sources(10)
    data = SegTensors.from_arrays(make_segmentation_canvases(images, labels, 5, size=16))
    batches = list(data.batches(2, shuffle=True, seed=0))
    assert [len(b[0]) for b in batches] == [2, 2, 1] and batches[0][1].dtype == torch.int64
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.sum(dim=(1, 2)).tolist()) == sorted(data.masks.sum(dim=(1, 2)).tolist())

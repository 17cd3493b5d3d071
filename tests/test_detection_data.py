"""Detection data: the COCO-format loader (tiny files written here), the synthetic canvases and joint augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data.detection import CocoDetection, collate_detection
from kdforge.data.synth.detection import augment_detection, make_canvases, make_detection_splits
from kdforge.errors import DataError

# ---------------------------------------------------------------- COCO loader


def _write_coco(root: Path, anns: list[dict] | None = None, images: list[dict] | None = None) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2017").mkdir(exist_ok=True)
    for name, size in (("a.png", (40, 30)), ("b.png", (40, 30))):
        Image.fromarray(np.full((size[1], size[0], 3), 120, dtype=np.uint8)).save(root / "val2017" / name)
    data = {
        "images": images
        if images is not None
        else [
            {"id": 7, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": anns
        if anns is not None
        else [
            {"id": 1, "image_id": 7, "category_id": 18, "bbox": [1, 2, 10, 5], "area": 50.0, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [20, 10, 20, 20.5], "area": 400.0, "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 5, "bbox": [0, 0, 4, 4], "area": 16.0},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 5, "name": "car"}],
    }
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_loader_maps_categories_and_boxes(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    ds = CocoDetection.from_root(tmp_path, "val2017")
    assert ds.classes == ["car", "dog"] and ds.category_ids == [5, 18]
    assert len(ds) == 2
    img, t = ds[1]  # image ids sorted: 3 then 7
    assert img.shape == (3, 30, 40) and img.dtype == torch.uint8
    assert t["labels"].tolist() == [1, 0]
    # [20, 10, 20, 20.5] reaches 0.5 px below the 30 px image: within the 1 px tolerance, clipped
    torch.testing.assert_close(t["boxes"], torch.tensor([[1.0, 2.0, 11.0, 7.0], [20.0, 10.0, 40.0, 30.0]]))
    assert t["iscrowd"].tolist() == [False, True] and t["areas"].tolist() == [50.0, 400.0]
    images, batch = collate_detection([ds[0], ds[1]])
    assert images.shape == (2, 3, 30, 40)
    assert batch["labels"].tolist() == [[0, -1], [1, 0]] and batch["image_ids"].tolist() == [0, 1]


def test_coco_loader_empty_image_policy(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [1, 2, 10, 5]}]
    path = _write_coco(tmp_path, anns=anns)
    assert len(CocoDetection(path, tmp_path / "val2017")) == 2  # "keep": background image
    assert CocoDetection(path, tmp_path / "val2017")[0][1]["labels"].numel() == 0
    assert len(CocoDetection(path, tmp_path / "val2017", empty_images="skip")) == 1
    with pytest.raises(DataError, match="image 3 .*has no annotations"):
        CocoDetection(path, tmp_path / "val2017", empty_images="error")


@pytest.mark.parametrize(
    "ann,message",
    [
        ({"id": 9, "image_id": 7, "category_id": 99, "bbox": [1, 1, 2, 2]}, "category_id 99, which is not in"),
        ({"id": 9, "image_id": 7, "category_id": 5, "bbox": [35, 1, 7, 2]}, "outside image 7 .*more than 1.0 px"),
        ({"id": 9, "image_id": 7, "category_id": 5, "bbox": [-2, 1, 7, 2]}, "outside image 7"),
        ({"id": 9, "image_id": 7, "category_id": 5, "bbox": [1, 1, 0, 2]}, "empty box"),
        ({"id": 9, "image_id": 42, "category_id": 5, "bbox": [1, 1, 2, 2]}, "image_id 42, not in images"),
        ({"id": 9, "image_id": 7, "category_id": 5}, "annotation lacks 'bbox'"),
    ],
)
def test_coco_loader_bad_annotations(tmp_path: Path, ann: dict, message: str) -> None:
    path = _write_coco(tmp_path, anns=[ann])
    with pytest.raises(DataError, match=message):
        CocoDetection(path, tmp_path / "val2017")


def test_coco_loader_bad_files(tmp_path: Path) -> None:
    path = _write_coco(tmp_path)
    (tmp_path / "val2017" / "a.png").write_bytes(b"not an image")
    ds = CocoDetection(path, tmp_path / "val2017")
    with pytest.raises(DataError, match="a.png .*cannot be decoded"):
        ds[1]
    (tmp_path / "val2017" / "b.png").unlink()
    with pytest.raises(DataError, match="b.png .*does not exist"):
        CocoDetection(path, tmp_path / "val2017")
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        CocoDetection(path, tmp_path / "val2017")
    with pytest.raises(DataError, match="does not exist"):
        CocoDetection(tmp_path / "missing.json", tmp_path / "val2017")


def test_coco_loader_size_mismatch(tmp_path: Path) -> None:
    images = [{"id": 7, "file_name": "a.png", "width": 50, "height": 30}]
    path = _write_coco(tmp_path, anns=[], images=images)
    with pytest.raises(DataError, match="is 40x30 but the annotation file says 50x30"):
        CocoDetection(path, tmp_path / "val2017")[0]


# ---------------------------------------------------------------- synthetic canvases


def _source(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, size=n)


def test_canvases_deterministic_per_seed() -> None:
    imgs, labs = _source()
    a = make_canvases(imgs, labs, 6, seed=1)
    b = make_canvases(imgs, labs, 6, seed=1)
    c = make_canvases(imgs, labs, 6, seed=2)
    assert a.images.tobytes() == b.images.tobytes() and a.boxes.tobytes() == b.boxes.tobytes()
    assert a.images.tobytes() != c.images.tobytes()
    # channels-last input gives the same canvases
    d = make_canvases(imgs.transpose(0, 2, 3, 1).copy(), labs, 6, seed=1)
    assert d.images.tobytes() == a.images.tobytes()


def test_canvases_boxes_labels_and_visibility() -> None:
    imgs, labs = _source()
    c = make_canvases(imgs, labs, 40, seed=3, min_visible=0.5)
    assert c.images.shape == (40, 3, 96, 96) and c.images.dtype == np.uint8
    n = (c.labels >= 0).sum(1)
    assert n.min() >= 1 and n.max() <= 4
    for k in range(40):
        owner = np.full((96, 96), -1)
        valid = np.flatnonzero(c.labels[k] >= 0)
        assert (valid == np.arange(len(valid))).all()  # padding only at the end
        for j in valid:
            x1, y1, x2, y2 = c.boxes[k, j].astype(int)
            w, h = x2 - x1, y2 - y1
            assert 16 <= w <= 48 and 12 <= h <= 64 and x1 >= 0 and x2 <= 96 and y1 >= 0 and y2 <= 96
            owner[y1:y2, x1:x2] = j
        for j in valid:  # every labelled object is at least half visible
            x1, y1, x2, y2 = c.boxes[k, j].astype(int)
            assert (owner == j).sum() >= 0.5 * (x2 - x1) * (y2 - y1)
        assert (c.boxes[k, len(valid) :] == 0).all()
    assert set(np.unique(c.labels[c.labels >= 0])) <= set(labs.tolist())


def test_canvas_pixels_come_from_the_pasted_image() -> None:
    imgs = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    imgs[1] = 255  # any object or background is all black or all white
    c = make_canvases(imgs, np.array([0, 1]), 10, seed=0, min_size=32, max_size=32)
    for k in range(10):
        for j in np.flatnonzero(c.labels[k] >= 0):
            x1, y1, x2, y2 = c.boxes[k, j].astype(int)
            patch = c.images[k, :, y1:y2, x1:x2]
            if j == (c.labels[k] >= 0).sum() - 1:  # the top object is fully visible
                assert (patch == (255 if c.labels[k, j] == 1 else 0)).all()


def test_splits_use_their_own_images_and_bad_input() -> None:
    imgs, labs = _source()
    tr, te = make_detection_splits(imgs[:30], labs[:30], imgs[30:], labs[30:], 3, 2, seed=0)
    assert tr.images.shape[0] == 3 and te.images.shape[0] == 2
    black, white = np.zeros((4, 3, 32, 32), np.uint8), np.full((4, 3, 32, 32), 255, np.uint8)
    tr, te = make_detection_splits(black, np.zeros(4), white, np.ones(4), 3, 3, seed=0)
    assert (tr.images == 0).all() and (te.images == 255).all()  # each split only sees its own images
    assert set(tr.labels[tr.labels >= 0].tolist()) == {0} and set(te.labels[te.labels >= 0].tolist()) == {1}
    with pytest.raises(DataError, match="uint8"):
        make_canvases(imgs.astype(np.float32), labs, 1, 0)
    with pytest.raises(DataError, match="min_objects"):
        make_canvases(imgs, labs, 1, 0, min_objects=3, max_objects=2)


def test_embedded_subset_canvases() -> None:
    from kdforge.data import _embedded_arrays

    d = _embedded_arrays()
    c = make_canvases(d.train_images[:100], d.train_labels[:100], 4, 0)
    assert c.images.std() > 10  # real texture, not a flat fill


# ---------------------------------------------------------------- augmentation


def test_augment_moves_boxes_with_the_pixels() -> None:
    # a white rectangle on black: after flip + scale + crop, the bright region must coincide with the new box
    b, h, w = 6, 64, 64
    images = torch.zeros(b, 1, h, w)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 44.0], [0, 0, 0, 0]]).expand(b, 2, 4).clone()
    labels = torch.tensor([[3, -1]]).expand(b, 2).clone()
    images[:, :, 20:44, 10:30] = 1.0
    g = torch.Generator().manual_seed(0)
    out, nb, nl = augment_detection(images, boxes, labels, g, flip_p=0.5, scale_range=(0.6, 1.4), min_box_size=1)
    assert out.shape == images.shape and (nl[:, 1] == -1).all()
    for i in range(b):
        if nl[i, 0] < 0:
            continue
        x1, y1, x2, y2 = nb[i, 0].tolist()
        inside = out[i, 0, int(np.ceil(y1)) + 1 : int(y2) - 1, int(np.ceil(x1)) + 1 : int(x2) - 1]
        assert inside.numel() > 0 and inside.min() > 0.99
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[max(int(y1) - 1, 0) : int(np.ceil(y2)) + 1, max(int(x1) - 1, 0) : int(np.ceil(x2)) + 1] = True
        assert out[i, 0][~mask].abs().max() < 1e-6  # nothing bright outside the box


def test_augment_identity_flip_and_removal() -> None:
    images = torch.rand(2, 3, 32, 32)
    boxes = torch.tensor([[[2.0, 4.0, 12.0, 20.0]], [[0.0, 0.0, 3.0, 3.0]]])
    labels = torch.tensor([[1], [2]])
    out, nb, nl = augment_detection(images, boxes, labels, flip_p=0.0, scale_range=(1.0, 1.0))
    torch.testing.assert_close(out, images)
    torch.testing.assert_close(nb[0], boxes[0])
    assert nl.tolist() == [[1], [-1]] and (nb[1] == 0).all()  # 3 px box < min_box_size 4: dropped
    out, nb, _ = augment_detection(images, boxes, labels, flip_p=1.0, scale_range=(1.0, 1.0))
    torch.testing.assert_close(out, images.flip(-1))
    torch.testing.assert_close(nb[0], torch.tensor([[20.0, 4.0, 30.0, 20.0]]))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = augment_detection(images, boxes, labels, g1)
    b = augment_detection(images, boxes, labels, g2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

"""DOTA-format loader: tiny image + label files written by the test, polygons → le90 boxes, class mapping and the
one-line errors for malformed files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data.dota import DOTA_V1_CLASSES, DotaDataset, collate_dota, parse_dota_labels
from kdforge.errors import DataError
from kdforge.ops.rotated import rbox_to_poly


def _write(root, stem, lines, size=(20, 12), suffix=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(size[0] * size[1] * 3) % 251).astype(np.uint8).reshape(size[1], size[0], 3)
    Image.fromarray(pixels).save(root / "images" / f"{stem}{suffix}")
    (root / "labelTxt" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return pixels


def test_reads_images_headers_polygons_and_discovers_classes(tmp_path):
    pixels = _write(
        tmp_path,
        "P0001",
        [
            "imagesource:GoogleEarth",
            "gsd:0.146343590398",
            "2 1 10 1 10 5 2 5 small-vehicle 0",  # axis-aligned 8 × 4 at (6, 3)
            "",
            "1 1 3 1 3 9 1 9 ship 1",  # taller than wide: θ = -π/2
        ],
    )
    _write(tmp_path, "P0002", ["0 0 4 0 4 2 0 2 plane"], size=(16, 10), suffix=".jpg")  # 9 fields: difficult 0
    ds = DotaDataset(tmp_path)
    assert ds.classes == ["plane", "ship", "small-vehicle"]  # sorted when discovered
    assert len(ds) == 2
    image, t = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 20)
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    torch.testing.assert_close(
        t["rboxes"], torch.tensor([[6.0, 3.0, 8.0, 4.0, 0.0], [2.0, 5.0, 8.0, 2.0, -math.pi / 2]]), atol=1e-5, rtol=0
    )
    assert t["labels"].tolist() == [2, 1]
    assert t["difficult"].tolist() == [False, True]
    assert t["polygons"].shape == (2, 4, 2)
    assert ds.annotations[1].difficult.tolist() == [False]
    with pytest.raises(DataError, match="different sizes"):
        collate_dota([ds[0], ds[1]])
    images, batch = collate_dota([ds[0], ds[0]])
    assert images.shape == (2, 3, 12, 20)
    assert batch["labels"].tolist() == [[2, 1], [2, 1]] and batch["difficult"][0].tolist() == [False, True]


def test_collate_pads_targets(tmp_path):
    _write(tmp_path, "a", ["0 0 4 0 4 2 0 2 plane 0", "0 0 4 0 4 2 0 2 ship 1"])
    _write(tmp_path, "b", [])
    ds = DotaDataset(tmp_path)
    images, batch = collate_dota([ds[0], ds[1]])
    assert images.shape == (2, 3, 12, 20)
    assert batch["labels"].tolist() == [[0, 1], [-1, -1]]
    assert batch["difficult"].tolist() == [[False, True], [False, False]]
    torch.testing.assert_close(batch["rboxes"][0, 0], torch.tensor([2.0, 1.0, 4.0, 2.0, 0.0]))


def test_given_class_list_and_rotated_polygons(tmp_path):
    box = torch.tensor([30.0, 20.0, 16.0, 6.0, 0.6], dtype=torch.float64)
    poly = rbox_to_poly(box).flatten().tolist()
    _write(tmp_path, "a", [" ".join(f"{v:.6f}" for v in poly) + " harbor 0"], size=(60, 40))
    ds = DotaDataset(tmp_path, classes=DOTA_V1_CLASSES)
    assert ds.classes == list(DOTA_V1_CLASSES)
    _, t = ds[0]
    assert t["labels"].tolist() == [DOTA_V1_CLASSES.index("harbor")]
    torch.testing.assert_close(t["rboxes"][0].double(), box, atol=1e-4, rtol=0)


def test_empty_label_file_gives_no_objects(tmp_path):
    _write(tmp_path, "empty", ["imagesource:GoogleEarth", "gsd:null"])
    ds = DotaDataset(tmp_path, classes=["plane"])
    _, t = ds[0]
    assert t["rboxes"].shape == (0, 5) and t["labels"].shape == (0,)


@pytest.mark.parametrize(
    "line,message",
    [
        ("1 1 3 1 3 9 1 9 ship 0 extra", "got 11 fields"),
        ("1 1 3 1 3 9 1 9", "got 8 fields"),
        ("1 1 3 1 3 9 1 ship 0", "must be numbers"),  # 9 fields read as 'no difficult': 'ship' is a coordinate
        ("1 1 3 1 3 9 1 x ship 0", "must be numbers"),
        ("1 1 3 1 3 nan 1 9 ship 0", "must be finite"),
        ("1 1 3 1 3 9 1 9 ship 2", "difficult must be 0 or 1"),
        ("1 1 3 1 3 9 1 9 ship yes", "difficult must be 0 or 1"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    _write(tmp_path, "bad", ["gsd:0.1", "0 0 4 0 4 2 0 2 ship 0", line])
    with pytest.raises(DataError, match=rf"bad\.txt:3: .*{message}"):
        DotaDataset(tmp_path)
    with pytest.raises(DataError, match=r"bad\.txt:3"):
        parse_dota_labels(tmp_path / "labelTxt" / "bad.txt")


def test_unknown_class_with_a_given_list(tmp_path):
    _write(tmp_path, "u", ["0 0 4 0 4 2 0 2 plane 0", "0 0 4 0 4 2 0 2 spaceship 0"])
    with pytest.raises(DataError, match=r"u\.txt:2: unknown class 'spaceship'"):
        DotaDataset(tmp_path, classes=DOTA_V1_CLASSES)
    with pytest.raises(DataError, match="duplicate"):
        DotaDataset(tmp_path, classes=["plane", "plane"])


def test_unpaired_and_missing_files(tmp_path):
    _write(tmp_path, "ok", ["0 0 4 0 4 2 0 2 plane 0"])
    (tmp_path / "labelTxt" / "orphan.txt").write_text("0 0 4 0 4 2 0 2 plane 0\n")
    with pytest.raises(DataError, match=r"label file .*orphan\.txt has no image"):
        DotaDataset(tmp_path)
    (tmp_path / "labelTxt" / "orphan.txt").unlink()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(DataError, match=r"image .*lonely\.png has no label file"):
        DotaDataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        DotaDataset(tmp_path / "nowhere")
    (tmp_path / "images" / "lonely.png").unlink()
    (tmp_path / "images" / "ok.png").write_bytes(b"not a png")
    ds = DotaDataset(tmp_path)
    with pytest.raises(DataError, match=r"cannot decode DOTA image .*ok\.png"):
        ds[0]

"""Scene canvases for DATS: deterministic, the labelled object really is where the box says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.data import _embedded_arrays
from kdforge.data.synth.scenes import make_scenes
from kdforge.errors import DataError


@pytest.fixture(scope="module")
def source() -> tuple[np.ndarray, np.ndarray]:
    data = _embedded_arrays()
    return data.test_images[:200], data.test_labels[:200]


def test_same_seed_same_bytes_other_seed_other_bytes(source) -> None:
    a = make_scenes(*source, 12, seed=3)
    b = make_scenes(*source, 12, seed=3)
    c = make_scenes(*source, 12, seed=4)
    assert a.images.tobytes() == b.images.tobytes()
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
    assert a.images.tobytes() != c.images.tobytes()


def test_object_is_pasted_whole_inside_its_box(source) -> None:
    images, labels = source
    scenes = make_scenes(images, labels, 20, seed=0, canvas=64, object_size=(32, 32))
    assert scenes.images.shape == (20, 3, 64, 64) and scenes.images.dtype == np.uint8
    for img, box, src, lab in zip(scenes.images, scenes.boxes, scenes.source_index, scenes.labels, strict=True):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 == 32
        # at its native size the pasted object is byte-identical to its source image
        assert np.array_equal(img[:, y0:y1, x0:x1], images[src])
        assert lab == labels[src]


def test_objects_are_small_and_sizes_in_range(source) -> None:
    scenes = make_scenes(*source, 30, seed=1)
    sides = scenes.boxes[:, 2] - scenes.boxes[:, 0]
    assert sides.min() >= 20 and sides.max() <= 32
    assert np.array_equal(sides, scenes.boxes[:, 3] - scenes.boxes[:, 1])
    assert len(set(scenes.source_index.tolist())) == 30, "objects are drawn without replacement"


def test_bad_sources_are_one_clear_error(source) -> None:
    images, labels = source
    with pytest.raises(DataError, match=r"uint8 \[N, 3, H, W\]"):
        make_scenes(images.transpose(0, 2, 3, 1), labels, 4, seed=0)
    with pytest.raises(DataError, match="object_size"):
        make_scenes(images, labels, 4, seed=0, canvas=32, object_size=(20, 40))


def test_registered_scene_dataset_is_built_once_and_cached(tmp_path, monkeypatch) -> None:
    from test_data import _jpeg_npz

    from kdforge.data import build_data

    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "cache"))
    _jpeg_npz(tmp_path / "small.npz", n=24)
    first = build_data("cifar10_scenes", root=str(tmp_path / "small.npz"), batch_size=8, eval_batch_size=8)
    assert first.image_size == 96 and first.num_train == 24 and first.test.num_samples == 24
    assert len(list((tmp_path / "cache").glob("cifar10_scenes_*.npz"))) == 1
    again = build_data("cifar10_scenes", root=str(tmp_path / "small.npz"), batch_size=8, eval_batch_size=8)
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.labels, first.test.labels)

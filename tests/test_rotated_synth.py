"""No-download oriented data: determinism, exact boxes (the alpha mask is the rotated rectangle, the source's axes
follow θ), placement rules, and the joint flip / quarter-turn augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.data.synth.oriented import make_oriented_split, make_oriented_synth, random_flip_rot90
from kdforge.errors import DataError
from kdforge.ops.rotated import rasterize_rboxes, rbox_intersection, rbox_to_poly


@pytest.fixture(scope="module")
def embedded():
    from kdforge.data import _embedded_arrays

    return _embedded_arrays()


def _solid_sources(n=10):
    """Source n is a solid colour (its label n), so every pasted pixel tells which object it came from."""
    colours = torch.tensor([[(37 * i) % 256, (91 * i + 20) % 256, (53 * i + 200) % 256] for i in range(n)])
    images = colours.view(n, 3, 1, 1).expand(n, 3, 32, 32).to(torch.uint8).contiguous()
    return images, torch.arange(n), colours.to(torch.uint8)


def test_deterministic_per_seed_from_real_images(embedded):
    d = embedded

    def build(seed):
        return make_oriented_synth(
            d.train_images[:500],
            d.train_labels[:500],
            d.test_images[:200],
            d.test_labels[:200],
            d.classes,
            num_train=12,
            num_test=6,
            seed=seed,
        )

    a, b = build(3), build(3)
    c = make_oriented_split(d.train_images[:500], d.train_labels[:500], 12, seed=2 * 4)  # the train split of seed 4
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert x.images.numpy().tobytes() == y.images.numpy().tobytes()
        assert torch.equal(x.rboxes, y.rboxes) and torch.equal(x.labels, y.labels)
    assert a.train.images.numpy().tobytes() != c.images.numpy().tobytes()
    assert a.train.images.shape == (12, 3, 96, 96) and a.train.images.dtype == torch.uint8
    assert a.classes == list(d.classes)
    imgs, tg = a.train.batch(torch.tensor([3, 1]))
    assert torch.equal(imgs, a.train.images[[3, 1]]) and torch.equal(tg["rboxes"], a.train.rboxes[[3, 1]])
    assert torch.equal(tg["labels"], a.train.labels[[3, 1]]) and len(a.train) == 12
    # the test split draws from the test images: its objects' labels come from test_labels
    assert set(a.test.labels[a.test.labels >= 0].tolist()) <= set(d.test_labels[:200].tolist())


def test_boxes_are_le90_inside_the_canvas_and_disjoint():
    images, labels, _ = _solid_sources()
    s = make_oriented_split(images, labels, 64, seed=0)
    real = s.labels >= 0
    counts = real.sum(1)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 4 and len(set(counts.tolist())) > 1
    # real objects first, padding after
    assert bool((real[:, :-1] | ~real[:, 1:]).all())
    b = s.rboxes[real].double()
    assert bool((b[:, 2] >= b[:, 3]).all())
    ratio = b[:, 2] / b[:, 3]
    assert float(ratio.min()) >= 2 - 1e-5 and float(ratio.max()) <= 4 + 1e-5
    assert bool(((b[:, 4] >= -math.pi / 2) & (b[:, 4] < math.pi / 2)).all())
    poly = rbox_to_poly(b)
    assert float(poly.min()) >= -1e-4 and float(poly.max()) <= 96 + 1e-4
    for i in range(64):
        bb = s.rboxes[i, real[i]].double()
        inter = rbox_intersection(bb[:, None], bb[None])
        assert float((inter - torch.diag(torch.diag(inter))).abs().max()) < 1e-6


def test_alpha_is_the_rotated_rectangle():
    images, labels, colours = _solid_sources()
    s = make_oriented_split(images, labels, 48, seed=1)
    for i in range(48):
        real = s.labels[i] >= 0
        boxes, labs = s.rboxes[i, real].double(), s.labels[i, real]
        masks = rasterize_rboxes(boxes, 96, 96)
        img = s.images[i].permute(1, 2, 0)  # [H, W, 3]
        for m, lab in zip(masks, labs, strict=True):
            assert bool((img[m] == colours[lab]).all())  # objects do not overlap: every covered pixel is its own
        outside = ~masks.any(0)
        bg = img[outside]
        assert bool((bg == bg[0]).all())  # one solid background


def test_source_axes_follow_the_angle():
    # a source whose brightness grows along x and whose green grows along y
    ramp = torch.linspace(0, 255, 32)
    src = torch.zeros(1, 3, 32, 32)
    src[0, 0] = ramp.view(1, 32)
    src[0, 1] = ramp.view(32, 1)
    s = make_oriented_split(src.round().to(torch.uint8), torch.zeros(1, dtype=torch.long), 32, seed=2, max_objects=1)
    img = s.images.double()
    for i in range(32):
        cx, cy, w, h, t = s.rboxes[i, 0].double().tolist()
        u = np.array([math.cos(t), math.sin(t)])
        v = np.array([-math.sin(t), math.cos(t)])

        def at(p, img=img, i=i):
            return img[i, :, int(p[1]), int(p[0])]

        c = np.array([cx, cy])
        assert at(c + 0.3 * w * u)[0] > at(c - 0.3 * w * u)[0] + 60  # red grows along (cos θ, sin θ)
        assert at(c + 0.3 * h * v)[1] > at(c - 0.3 * h * v)[1] + 20  # green along (-sin θ, cos θ)


def test_bad_arguments():
    images, labels, _ = _solid_sources()
    with pytest.raises(DataError, match="do not fit"):
        make_oriented_split(images, labels, 2, seed=0, long_side=(80, 100))
    with pytest.raises(DataError, match="uint8"):
        make_oriented_split(images.float(), labels, 2, seed=0)
    with pytest.raises(DataError, match="min_objects"):
        make_oriented_split(images, labels, 2, seed=0, min_objects=3, max_objects=2)
    # channels-last sources give the same data
    a = make_oriented_split(images, labels, 4, seed=0)
    b = make_oriented_split(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), 4, seed=0)
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_flip_rot90_moves_boxes_with_pixels(size):
    h, w = size
    g = torch.Generator().manual_seed(0)
    n, m = 64, 3
    boxes = torch.cat(
        [
            torch.rand(n, m, 2, generator=g) * torch.tensor([w, h]),
            3 + torch.rand(n, m, 2, generator=g) * 10,
            torch.rand(n, m, 1, generator=g) * 3 - 1.5,
        ],
        dim=-1,
    )
    labels = torch.randint(-1, 3, (n, m), generator=g)
    # the "image" of each sample is its boxes' masks: after augmentation it must equal the masks of the new boxes
    masks = rasterize_rboxes(boxes, h, w).to(torch.float32)  # [n, m, H, W]
    out_img, out_box = random_flip_rot90(masks, boxes, labels, torch.Generator().manual_seed(1))
    assert out_img.shape == masks.shape
    real = labels >= 0
    assert torch.equal(rasterize_rboxes(out_box, h, w)[real], out_img.bool()[real])
    assert torch.equal(out_box[~real], boxes[~real])  # padding untouched
    changed = (out_img != masks).flatten(1).any(1).float().mean()
    assert 0.5 < float(changed) < 1.0  # 7 of 8 group elements move a generic image
    again = random_flip_rot90(masks, boxes, labels, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out_img) and torch.equal(again[1], out_box)

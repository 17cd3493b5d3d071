"""Rotated-box geometry: le90 regularisation, polygon conversions, minimum-area rectangles and rotated IoU against
shapely, rotated NMS against a greedy reference, flips and 90° turns against the transformed pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.ops import rotated as R
from kdforge.ops.rotated import (
    flip_rboxes,
    hbb_to_rbox,
    min_area_rect,
    norm_angle_le90,
    poly_to_rbox,
    rasterize_rboxes,
    rbox_iou,
    rbox_iou_pairwise,
    rbox_overlap,
    rbox_to_hbb,
    rbox_to_poly,
    regularize_rboxes,
    rot90_rboxes,
    rotated_nms,
)

geom = pytest.importorskip("shapely.geometry")

PI = math.pi


def _random_rboxes(n, g, dtype=torch.float64, span=30.0, size=(0.5, 15.0)):
    c = torch.rand(n, 2, generator=g, dtype=dtype) * span
    wh = size[0] + torch.rand(n, 2, generator=g, dtype=dtype) * (size[1] - size[0])
    t = (torch.rand(n, 1, generator=g, dtype=dtype) - 0.5) * 4 * PI  # any angle: the IoU must not care
    return torch.cat([c, wh, t], dim=1)


def _same_corners(p, q, tol):
    """Corner sets of [..., 4, 2] polygons agree (any order)."""
    d = (p.unsqueeze(-2) - q.unsqueeze(-3)).norm(dim=-1)  # [..., 4, 4]
    return bool((d.amin(dim=-1) < tol).all() and (d.amin(dim=-2) < tol).all())


def _shapely_iou(pa, pb):
    a, b = geom.Polygon(pa), geom.Polygon(pb)
    inter = a.intersection(b).area
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


# ------------------------------------------------------------------------------------------------- conventions
def test_le90_normalisation_rules():
    boxes = torch.tensor(
        [
            [0, 0, 2, 4, 0.0],  # taller than wide → (4, 2, -π/2), as mmrotate hbb2obb_le90
            [0, 0, 4, 2, PI / 2],  # π/2 is outside [-π/2, π/2) → -π/2
            [0, 0, 4, 2, 3 * PI / 4],
            [0, 0, 4, 2, -PI / 2],
            [0, 0, -4, 2, 0.2],  # a negative side counts by its length
        ],
        dtype=torch.float64,
    )
    out = regularize_rboxes(boxes)
    expected = torch.tensor(
        [[0, 0, 4, 2, -PI / 2], [0, 0, 4, 2, -PI / 2], [0, 0, 4, 2, -PI / 4], [0, 0, 4, 2, -PI / 2], [0, 0, 4, 2, 0.2]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    t = torch.linspace(-10, 10, 1001, dtype=torch.float64)
    n = norm_angle_le90(t)
    assert bool(((n >= -PI / 2) & (n < PI / 2)).all())
    assert torch.allclose(torch.sin(2 * (n - t)), torch.zeros_like(t), atol=1e-12)  # same axis modulo π


def test_regularisation_keeps_the_rectangle():
    g = torch.Generator().manual_seed(0)
    boxes = _random_rboxes(500, g)
    reg = regularize_rboxes(boxes)
    assert bool((reg[:, 2] >= reg[:, 3]).all())
    assert bool(((reg[:, 4] >= -PI / 2) & (reg[:, 4] < PI / 2)).all())
    assert _same_corners(rbox_to_poly(reg), rbox_to_poly(boxes), 1e-9)
    torch.testing.assert_close(regularize_rboxes(reg), reg, atol=1e-12, rtol=0)  # idempotent


def test_corner_order_and_orientation():
    poly = rbox_to_poly(torch.tensor([10.0, 20.0, 4.0, 2.0, 0.0]))
    torch.testing.assert_close(poly, torch.tensor([[8.0, 19.0], [12.0, 19.0], [12.0, 21.0], [8.0, 21.0]]))
    g = torch.Generator().manual_seed(1)
    boxes = _random_rboxes(200, g)
    p = rbox_to_poly(boxes)
    shoelace = 0.5 * (p[:, :, 0] * p.roll(-1, 1)[:, :, 1] - p.roll(-1, 1)[:, :, 0] * p[:, :, 1]).sum(1)
    torch.testing.assert_close(shoelace, boxes[:, 2] * boxes[:, 3])


def test_hbb_conversions():
    g = torch.Generator().manual_seed(2)
    boxes = _random_rboxes(100, g)
    p = rbox_to_poly(boxes)
    env = torch.cat([p.amin(1), p.amax(1)], dim=1)
    torch.testing.assert_close(rbox_to_hbb(boxes), env)
    out = hbb_to_rbox(torch.tensor([[0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 2.0, 6.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0, 4.0, 2.0, 0.0], [1.0, 3.0, 6.0, 2.0, -PI / 2]]))


# ------------------------------------------------------------------------------------------------- min-area rectangle
def _check_rects(points, rects):
    for pts, rb in zip(points.numpy(), rects, strict=True):
        ref = geom.MultiPoint(pts).minimum_rotated_rectangle
        area = float(rb[2] * rb[3])
        assert area == pytest.approx(ref.area, rel=1e-9, abs=1e-9)
        # every point inside the rectangle: box-local coordinates within half the sides
        c, t = rb[:2].numpy(), float(rb[4])
        d = pts - c
        lu = d @ np.array([math.cos(t), math.sin(t)])
        lv = d @ np.array([-math.sin(t), math.cos(t)])
        assert np.all(np.abs(lu) <= rb[2].item() / 2 + 1e-9) and np.all(np.abs(lv) <= rb[3].item() / 2 + 1e-9)
    assert bool((rects[:, 2] >= rects[:, 3]).all())
    assert bool(((rects[:, 4] >= -PI / 2) & (rects[:, 4] < PI / 2)).all())


@pytest.mark.parametrize("n_points", [3, 4, 7, 12])
def test_min_area_rect_matches_shapely(n_points):
    g = torch.Generator().manual_seed(n_points)
    points = torch.rand(300, n_points, 2, generator=g, dtype=torch.float64) * 50 + 1000  # far from the origin
    _check_rects(points, min_area_rect(points))
    batched = min_area_rect(points.view(3, 100, n_points, 2))
    torch.testing.assert_close(batched.view(300, 5), min_area_rect(points))


def test_poly_to_rbox_recovers_boxes_and_handles_degenerate_polygons():
    g = torch.Generator().manual_seed(3)
    boxes = regularize_rboxes(_random_rboxes(300, g, size=(2.0, 20.0)))
    boxes = boxes[(boxes[:, 2] - boxes[:, 3]) > 0.1]  # squares have two le90 forms
    boxes = boxes[(boxes[:, 4] + PI / 2).abs() > 1e-3]  # away from the ±π/2 seam
    flat = rbox_to_poly(boxes).flatten(1)  # DOTA's x1 y1 ... x4 y4
    torch.testing.assert_close(poly_to_rbox(flat), boxes, atol=1e-9, rtol=0)
    # a noisy quadrilateral (DOTA annotations are not exact rectangles)
    quads = rbox_to_poly(boxes) + torch.randn(len(boxes), 4, 2, generator=g, dtype=torch.float64) * 0.5
    _check_rects(quads, poly_to_rbox(quads))
    # collinear points → a zero-height rectangle; one repeated point → an empty one
    seg = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [3.0, 3.0], [2.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(
        min_area_rect(seg), torch.tensor([[1.5, 1.5, 3 * math.sqrt(2), 0.0, PI / 4]], dtype=torch.float64)
    )
    dot = torch.full((1, 4, 2), 5.0, dtype=torch.float64)
    torch.testing.assert_close(min_area_rect(dot), torch.tensor([[5.0, 5.0, 0.0, 0.0, 0.0]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------- IoU
def _degenerate_pairs():
    """Pairs that stress the clipping: identical, nested, touching, sharing edges, parallel, zero-size, crossing."""
    s = PI / 4
    return torch.tensor(
        [
            [[5, 5, 4, 2, 0.3], [5, 5, 4, 2, 0.3]],  # identical
            [[5, 5, 4, 2, 0.3], [5, 5, 2, 4, 0.3 - PI / 2]],  # identical, another parametrisation
            [[5, 5, 8, 6, 0.2], [5.5, 5, 2, 1, 0.9]],  # nested
            [[0, 0, 2, 2, 0], [2, 0, 2, 2, 0]],  # touching edges
            [[0, 0, 2, 2, 0], [2, 2, 2, 2, 0]],  # touching corners
            [[0, 0, 2, 2, 0], [1, 0.5, 2, 2, 0]],  # parallel, overlapping edges
            [[0, 0, 4, 2, 0], [1, 0, 2, 2, 0]],  # sharing three edges
            [[0, 0, 4, 1, 0], [0, 0, 4, 1, PI / 2]],  # a cross
            [[0, 0, 2, 2, 0], [0, 0, 2, 2, s]],  # a star of eight vertices
            [[0, 0, 2, 2, 0], [0, 0, 0, 0, 0]],  # zero-size
            [[0, 0, 2, 2, 0], [0, 0, 3, 0, 0.4]],  # a segment
            [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],  # both empty
            [[0, 0, 2, 2, 0], [10, 10, 2, 2, 0.5]],  # far apart
            [[1e4, 1e4, 3, 1, 0.1], [1e4 + 0.5, 1e4, 3, 1, 0.1]],  # far from the origin, parallel
        ],
        dtype=torch.float64,
    )


def test_iou_degenerate_cases_match_shapely():
    pairs = _degenerate_pairs()
    iou = rbox_iou(pairs[:, 0], pairs[:, 1])
    polys = rbox_to_poly(pairs).numpy()
    ref = torch.tensor([_shapely_iou(p[0], p[1]) for p in polys], dtype=torch.float64)
    torch.testing.assert_close(iou, ref, atol=1e-10, rtol=0)  # shapely rounds at 1e-12 around (1e4, 1e4)
    inter = (3 - 0.5 * math.cos(0.1)) * (1 - 0.5 * math.sin(0.1))  # the offset in the boxes' own frame
    assert iou[13] == pytest.approx(inter / (6 - inter), abs=1e-12)
    assert iou[0] == pytest.approx(1.0, abs=1e-12) and iou[1] == pytest.approx(1.0, abs=1e-12)
    assert iou[3] == 0 and iou[4] == 0 and iou[9] == 0 and iou[11] == 0
    f32 = rbox_iou(pairs[:, 0].float(), pairs[:, 1].float())
    torch.testing.assert_close(f32.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def _derived_pairs(a, g):
    """Partners built from ``a`` so that degenerate geometry is the rule: identical boxes (also in the other
    parametrisation), shifts by multiples of half a side along the box's own axes (collinear edges; touching at ±1
    side), the same centre turned by π/4 or π/2, nested copies, and zero-size boxes."""
    n = len(a)
    cx, cy, w, h, t = a.unbind(-1)
    u = torch.stack([t.cos(), t.sin()], -1)
    v = torch.stack([-t.sin(), t.cos()], -1)
    ku = torch.randint(-2, 3, (n, 1), generator=g).double() / 2
    kv = torch.randint(-2, 3, (n, 1), generator=g).double() / 2
    kind = torch.randint(0, 7, (n,), generator=g)
    c = a[:, :2]
    shifted = torch.cat([c + ku * w[:, None] * u + kv * h[:, None] * v, a[:, 2:]], -1)
    options = [
        a.clone(),
        torch.stack([cx, cy, h, w, t + PI / 2], -1),
        shifted,
        torch.stack([cx, cy, w, h, t + PI / 4], -1),
        torch.stack([cx, cy, h, w, t], -1),  # the same centre turned by π/2
        torch.stack([cx, cy, 0.5 * w, 0.5 * h, t], -1),
        torch.stack([cx, cy, w, torch.zeros_like(h), t], -1),
    ]
    return torch.stack(options)[kind, torch.arange(n)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_iou_random_pairs_match_shapely(dtype, tol):
    g = torch.Generator().manual_seed(4)
    a = _random_rboxes(3000, g, dtype=torch.float64, span=15.0)
    b = _random_rboxes(3000, g, dtype=torch.float64, span=15.0)
    # a third generic, a third snapped to integer centres/sides and angles in multiples of π/4, a third derived from
    # their partner (degenerate configurations)
    snap = torch.arange(3000) % 3 == 1
    for x in (a, b):
        x[snap, :4] = torch.round(x[snap, :4])
        x[snap, 4] = torch.round(x[snap, 4] / (PI / 4)) * (PI / 4)
    derived = torch.arange(3000) % 3 == 2
    b[derived] = _derived_pairs(a[derived], g)
    ref = np.array([_shapely_iou(p, q) for p, q in zip(rbox_to_poly(a).numpy(), rbox_to_poly(b).numpy(), strict=True)])
    got = rbox_iou(a.to(dtype), b.to(dtype)).double().numpy()
    err = np.abs(got - ref)
    assert err.max() < tol, (err.max(), np.argmax(err))
    assert (ref > 0).mean() > 0.3  # the set actually overlaps often
    d = derived.numpy()
    assert (ref[d] > 1 - 1e-12).mean() > 0.2 and (ref[d] == 0).mean() > 0.1  # identical and touching / empty


def test_overlap_test_matches_shapely():
    g = torch.Generator().manual_seed(9)
    a = _random_rboxes(1500, g, span=20.0)
    b = _random_rboxes(1500, g, span=20.0)
    pa, pb = rbox_to_poly(a).numpy(), rbox_to_poly(b).numpy()
    ref = np.array([geom.Polygon(p).intersection(geom.Polygon(q)).area > 1e-9 for p, q in zip(pa, pb, strict=True)])
    got = rbox_overlap(a, b).numpy()
    assert (got == ref).all() and 0.2 < ref.mean() < 0.8
    pairs = _degenerate_pairs()
    assert rbox_overlap(pairs[:, 0], pairs[:, 1]).tolist() == (_shapely_intersections(pairs) > 1e-9).tolist()


def _shapely_intersections(pairs):
    polys = rbox_to_poly(pairs).numpy()
    return np.array([geom.Polygon(p[0]).intersection(geom.Polygon(p[1])).area for p in polys])


def test_pairwise_matches_elementwise_and_chunks(monkeypatch):
    g = torch.Generator().manual_seed(5)
    a, b = _random_rboxes(37, g), _random_rboxes(23, g)
    full = rbox_iou_pairwise(a, b)
    assert full.shape == (37, 23)
    torch.testing.assert_close(full, rbox_iou(a[:, None], b[None]))
    monkeypatch.setattr(R, "_PAIR_CHUNK", 200)
    torch.testing.assert_close(rbox_iou_pairwise(a, b), full)
    batched = rbox_iou_pairwise(a.view(1, 37, 5).expand(2, 37, 5), b.view(1, 23, 5).expand(2, 23, 5))
    torch.testing.assert_close(batched, full.expand(2, 37, 23))


def test_iou_gradients():
    a = torch.tensor([[5.0, 5.0, 6.0, 3.0, 0.3]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[6.0, 5.5, 4.0, 4.0, -0.4]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: rbox_iou(x, y), (a, b))
    iou = rbox_iou(a.float(), b.float())
    iou.sum().backward()
    assert bool(torch.isfinite(a.grad).all()) and bool((a.grad != 0).any())
    # disjoint and identical pairs: finite gradients (zero for the disjoint one)
    c = torch.tensor([[50.0, 50.0, 2.0, 1.0, 0.0], [5.0, 5.0, 6.0, 3.0, 0.3]], dtype=torch.float64, requires_grad=True)
    rbox_iou(c, a.detach().expand(2, 5)).sum().backward()
    assert bool(torch.isfinite(c.grad).all()) and bool((c.grad[0] == 0).all())


# ------------------------------------------------------------------------------------------------- NMS
def _greedy_nms(boxes, scores, thr, labels):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    polys = rbox_to_poly(boxes).numpy()
    kept = []
    for i in order:
        if all(labels[i] != labels[k] or _shapely_iou(polys[i], polys[k]) <= thr for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("class_aware", [True, False])
def test_nms_matches_greedy_reference(class_aware):
    g = torch.Generator().manual_seed(6)
    centres = torch.rand(6, 2, generator=g, dtype=torch.float64) * 60
    boxes = _random_rboxes(120, g, span=0.0, size=(4.0, 14.0))
    boxes[:, :2] = centres[torch.randint(0, 6, (120,), generator=g)] + torch.randn(120, 2, generator=g).double() * 3
    scores = torch.round(torch.rand(120, generator=g, dtype=torch.float64) * 20) / 20  # many ties
    labels = torch.randint(0, 3, (120,), generator=g)
    for thr in (0.1, 0.3, 0.5):
        keep = rotated_nms(boxes, scores, thr, labels if class_aware else None)
        ref = _greedy_nms(boxes, scores.tolist(), thr, labels.tolist() if class_aware else [0] * 120)
        assert keep.tolist() == ref
    assert rotated_nms(boxes[:0], scores[:0], 0.5).numel() == 0


# ------------------------------------------------------------------------------------------------- flips, turns
def test_flip_and_rot90_transform_polygons_exactly():
    g = torch.Generator().manual_seed(7)
    w_img, h_img = 50.0, 30.0
    boxes = _random_rboxes(200, g)
    p = rbox_to_poly(boxes)
    hf = flip_rboxes(boxes, w_img, h_img, horizontal=True)
    assert _same_corners(rbox_to_poly(hf), torch.stack([w_img - p[..., 0], p[..., 1]], -1), 1e-9)
    vf = flip_rboxes(boxes, w_img, h_img, horizontal=False)
    assert _same_corners(rbox_to_poly(vf), torch.stack([p[..., 0], h_img - p[..., 1]], -1), 1e-9)
    q, size = p, (w_img, h_img)
    for k in range(1, 5):
        q = torch.stack([q[..., 1], size[0] - q[..., 0]], -1)  # one quarter turn: (x, y) → (y, W − x)
        size = (size[1], size[0])
        out = rot90_rboxes(boxes, k, w_img, h_img)
        assert _same_corners(rbox_to_poly(out), q, 1e-9)
        assert bool((out[:, 2] >= out[:, 3]).all()) and bool(((out[:, 4] >= -PI / 2) & (out[:, 4] < PI / 2)).all())


def test_flip_and_rot90_match_the_transformed_pixels():
    g = torch.Generator().manual_seed(8)
    h_img, w_img = 24, 40
    boxes = torch.cat(
        [
            torch.rand(30, 2, generator=g) * torch.tensor([w_img, h_img]),
            2 + torch.rand(30, 2, generator=g) * 12,
            torch.rand(30, 1, generator=g) * 6 - 3,
        ],
        1,
    ).double()
    masks = rasterize_rboxes(boxes, h_img, w_img)  # [30, H, W]
    torch.testing.assert_close(rasterize_rboxes(flip_rboxes(boxes, w_img, h_img, True), h_img, w_img), masks.flip(-1))
    torch.testing.assert_close(rasterize_rboxes(flip_rboxes(boxes, w_img, h_img, False), h_img, w_img), masks.flip(-2))
    for k in range(4):
        turned = torch.rot90(masks, k, dims=(-2, -1))
        hh, ww = turned.shape[-2:]
        torch.testing.assert_close(rasterize_rboxes(rot90_rboxes(boxes, k, w_img, h_img), hh, ww), turned)

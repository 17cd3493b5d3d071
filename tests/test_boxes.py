"""Box ops against independent numpy brute force and a greedy pure-Python NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.ops import boxes as B


def _random_boxes(rng: np.random.Generator, n: int, degenerate: bool = True) -> np.ndarray:
    xy = rng.uniform(0, 50, size=(n, 2))
    wh = rng.uniform(0, 30, size=(n, 2))
    if degenerate:
        wh[rng.random(n) < 0.15, 0] = 0.0  # zero width
        wh[rng.random(n) < 0.15, 1] = 0.0  # zero height
    # integer corners make exact ties and exact touching edges likely
    return np.round(np.concatenate([xy, xy + wh], axis=1))


def _np_iou_giou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    iou = np.zeros((len(a), len(b)))
    giou = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            iou[i, j] = inter / union if union > 0 else 0.0
            cw = max(p[2], q[2]) - min(p[0], q[0])
            ch = max(p[3], q[3]) - min(p[1], q[1])
            c = cw * ch
            giou[i, j] = iou[i, j] - ((c - union) / c if c > 0 else 0.0)
    return iou, giou


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_giou_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _random_boxes(rng, 23), _random_boxes(rng, 17)
    iou, giou = _np_iou_giou(a, b)
    ta, tb = torch.tensor(a), torch.tensor(b)
    np.testing.assert_allclose(B.box_iou(ta, tb).numpy(), iou, atol=1e-12)
    np.testing.assert_allclose(B.box_giou(ta, tb).numpy(), giou, atol=1e-12)
    # elementwise versions on the diagonal pairs, and batched leading dims
    np.testing.assert_allclose(B.elementwise_iou(ta[:17], tb).numpy(), np.diag(iou[:17]), atol=1e-12)
    np.testing.assert_allclose(B.elementwise_giou(ta[:17], tb).numpy(), np.diag(giou[:17]), atol=1e-12)
    batched = B.box_iou(torch.stack([ta, ta.flip(0)]), torch.stack([tb, tb]))
    np.testing.assert_allclose(batched[1].numpy(), iou[::-1], atol=1e-12)


def test_iou_limit_cases() -> None:
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert B.box_iou(box, box).item() == 1.0
    assert B.elementwise_giou(box[0], box[0]).item() == 1.0
    far = torch.tensor([[20.0, 0.0, 30.0, 10.0]])
    assert B.box_iou(box, far).item() == 0.0
    assert B.box_giou(box, far).item() == pytest.approx(0.0 - (300 - 200) / 300)
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert B.box_iou(point, point).item() == 0.0
    assert B.elementwise_giou(point[0], point[0]).item() == 0.0
    assert torch.isfinite(B.box_giou(point, box)).all()


def test_conversions_round_trip() -> None:
    rng = np.random.default_rng(3)
    boxes = torch.tensor(_random_boxes(rng, 10))
    torch.testing.assert_close(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(boxes)), boxes)
    torch.testing.assert_close(B.xywh_to_xyxy(B.xyxy_to_xywh(boxes)), boxes)
    cx = B.xyxy_to_cxcywh(torch.tensor([2.0, 4.0, 6.0, 10.0]))
    assert cx.tolist() == [4.0, 7.0, 4.0, 6.0]
    assert B.xywh_to_xyxy(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert B.box_area(torch.tensor([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 4.0, 9.0]])).tolist() == [6.0, 0.0]


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    iou, _ = _np_iou_giou(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(classes[k] != classes[i] or iou[k, i] <= thr for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thr", [0.3, 0.5])
def test_nms_matches_greedy_python(seed: int, thr: float) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    boxes = _random_boxes(rng, n)
    boxes[5] = boxes[4]  # duplicate box ...
    scores = rng.integers(0, 6, size=n).astype(np.float64) / 5  # ... and many score ties
    classes = rng.integers(0, 3, size=n)
    got = B.batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes), thr).tolist()
    assert got == _greedy_nms(boxes, scores, classes, thr)
    single = B.nms(torch.tensor(boxes), torch.tensor(scores), thr).tolist()
    assert single == _greedy_nms(boxes, scores, np.zeros(n, dtype=int), thr)


def test_nms_empty_and_duplicates() -> None:
    assert B.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    assert B.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    # equal scores: the smallest index survives; other class is untouched
    assert B.batched_nms(box, torch.ones(3), torch.tensor([0, 0, 1]), 0.5).tolist() == [0, 2]

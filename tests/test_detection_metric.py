"""COCO box AP/AR against pycocotools' COCOeval on random detections and ground truths; the two-rank reducer."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import pytest
import torch

from kdforge.ops.coco_eval import IOU_THRESHOLDS, RECALL_THRESHOLDS
from kdforge.tasks.detection import DetectionEvaluator, Detections

KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
NUM_CLASSES = 5  # class 4 never has ground truth: -1 for it, left out of the means


def _random_image(rng: np.random.Generator, crowd: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    g = int(rng.integers(0, 7))
    side = rng.choice([10.0, 40.0, 120.0], size=g) * rng.uniform(0.5, 1.5, size=g)  # small, medium, large
    xy = rng.uniform(0, 200, size=(g, 2))
    gt = np.concatenate([xy, xy + side[:, None] * rng.uniform(0.6, 1.4, size=(g, 2))], axis=1)
    gl = rng.integers(0, NUM_CLASSES - 1, size=g)
    gc = (rng.random(g) < 0.15) if crowd else np.zeros(g, dtype=bool)
    # detections: jittered copies of gts (true and false positives at every IoU) plus random boxes
    src_idx = rng.integers(0, g, size=rng.integers(0, 2 * g + 1)) if g else np.zeros(0, dtype=int)
    src = gt[src_idx]
    wh = np.concatenate([src[:, 2:] - src[:, :2]] * 2, axis=1)
    jitter = src + rng.normal(0, 0.12, size=src.shape) * wh
    noise_xy = rng.uniform(0, 250, size=(int(rng.integers(0, 5)), 2))
    noise = np.concatenate([noise_xy, noise_xy + rng.uniform(2, 90, size=noise_xy.shape)], axis=1)
    db = np.concatenate([jitter, noise])
    db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 0.5)
    dl = rng.integers(0, NUM_CLASSES, size=len(db))
    dl[: len(src)] = np.where(rng.random(len(src)) < 0.85, gl[src_idx], dl[: len(src)])
    ds = np.round(rng.uniform(0, 1, size=len(db)), 1)  # coarse scores: many ties
    return {"boxes": gt, "labels": gl, "crowd": gc}, {"boxes": db, "labels": dl, "scores": ds}


def _dataset(seed: int, n_images: int = 12, crowd: bool = True) -> list[tuple[dict, dict]]:
    rng = np.random.default_rng(seed)
    return [_random_image(rng, crowd) for _ in range(n_images)]


def _pycocotools_stats(data: list[tuple[dict, dict]]) -> dict[str, float]:
    coco_mod = pytest.importorskip("pycocotools.coco")
    cocoeval_mod = pytest.importorskip("pycocotools.cocoeval")
    images, anns, results = [], [], []
    ann_id = 1
    for img_id, (gt, dt) in enumerate(data):
        images.append({"id": img_id, "width": 300, "height": 300})
        for box, lab, cr in zip(gt["boxes"], gt["labels"], gt["crowd"], strict=False):
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({"id": ann_id, "image_id": img_id, "category_id": int(lab) + 1, "iscrowd": int(cr),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})  # fmt: skip
            ann_id += 1
        for box, lab, sc in zip(dt["boxes"], dt["labels"], dt["scores"], strict=False):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": img_id, "category_id": int(lab) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(sc)})  # fmt: skip
    cats = [{"id": k + 1, "name": str(k)} for k in range(NUM_CLASSES)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt_api = coco_mod.COCO()
        gt_api.dataset = {"images": images, "annotations": anns, "categories": cats}
        gt_api.createIndex()
        dt_api = gt_api.loadRes(results) if results else coco_mod.COCO()
        ev = cocoeval_mod.COCOeval(gt_api, dt_api, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(KEYS, (float(v) for v in ev.stats), strict=False))


def _feed(ev: DetectionEvaluator, data: list[tuple[dict, dict]], ids: list[int]) -> None:
    """Feeds images ``ids`` as batches of up to 3, padded targets as a data loader would give them."""
    for start in range(0, len(ids), 3):
        chunk = ids[start : start + 3]
        m = max(1, max(len(data[i][0]["labels"]) for i in chunk))
        boxes = torch.zeros(len(chunk), m, 4, dtype=torch.float64)
        labels = torch.full((len(chunk), m), -1, dtype=torch.long)
        crowd = torch.zeros(len(chunk), m, dtype=torch.bool)
        preds = []
        for j, i in enumerate(chunk):
            gt, dt = data[i]
            g = len(gt["labels"])
            boxes[j, :g] = torch.tensor(gt["boxes"]).reshape(-1, 4)
            labels[j, :g] = torch.tensor(gt["labels"], dtype=torch.long)
            crowd[j, :g] = torch.tensor(gt["crowd"], dtype=torch.bool)
            preds.append(Detections(torch.tensor(dt["boxes"]).reshape(-1, 4), torch.tensor(dt["scores"]),
                                    torch.tensor(dt["labels"], dtype=torch.long)))  # fmt: skip
        ev.update(preds, {"boxes": boxes, "labels": labels, "iscrowd": crowd, "image_ids": torch.tensor(chunk)})


def test_thresholds_equal_numpy_linspace() -> None:
    assert IOU_THRESHOLDS.tolist() == np.linspace(0.5, 0.95, 10).tolist()
    assert RECALL_THRESHOLDS.tolist() == np.linspace(0.0, 1.0, 101).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_pycocotools(seed: int) -> None:
    data = _dataset(seed, crowd=seed % 2 == 0)
    ref = _pycocotools_stats(data)
    ev = DetectionEvaluator(NUM_CLASSES)
    _feed(ev, data, list(range(len(data))))
    got = ev.compute()
    for k in KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k
    assert 0 < got["AP"] < 1  # a non-trivial case, not all-perfect or all-missed


def test_many_detections_per_image_respect_max_dets() -> None:
    rng = np.random.default_rng(7)
    data = _dataset(7, n_images=4)
    for gt, dt in data:  # 150 detections of one class on each image: the 100 cut-off matters
        xy = rng.uniform(0, 200, size=(150, 2))
        dt["boxes"] = np.concatenate([xy, xy + rng.uniform(5, 100, size=(150, 2))], axis=1)
        dt["labels"] = np.zeros(150, dtype=int)
        dt["scores"] = rng.uniform(0, 1, size=150)
        gt["labels"][:] = 0
    ref = _pycocotools_stats(data)
    ev = DetectionEvaluator(NUM_CLASSES)
    _feed(ev, data, list(range(len(data))))
    got = ev.compute()
    for k in KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k


def test_perfect_and_empty_predictions() -> None:
    data = _dataset(11, crowd=False)
    for gt, dt in data:
        dt["boxes"], dt["labels"], dt["scores"] = gt["boxes"], gt["labels"], np.ones(len(gt["labels"]))
    ev = DetectionEvaluator(NUM_CLASSES)
    _feed(ev, data, list(range(len(data))))
    assert ev.compute()["AP"] == pytest.approx(1.0)
    for _gt, dt in data:
        dt["boxes"], dt["labels"], dt["scores"] = np.zeros((0, 4)), np.zeros(0, int), np.zeros(0)
    ev.reset()
    _feed(ev, data, list(range(len(data))))
    assert ev.compute()["AP"] == 0.0


class _TwoRanks:
    """Stands two processes up in one: ``gather`` returns both ranks' objects on rank 0 (the second caller); ``sum``
    returns the sum of the tensors given so far (exact for the last caller, which sees every rank's)."""

    def __init__(self) -> None:
        self.objs: list[Any] = []
        self.sums: list[torch.Tensor] = []

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sums.append(tensor)
        return torch.stack(self.sums).sum(0)

    def gather(self, obj: Any) -> list[Any] | None:
        self.objs.append(obj)
        return list(self.objs) if len(self.objs) == 2 else None


def test_two_rank_reduction_is_exact() -> None:
    data = _dataset(5)
    ids = list(range(len(data)))
    one = DetectionEvaluator(NUM_CLASSES)
    _feed(one, data, ids)
    expected = one.compute()
    r0, r1 = DetectionEvaluator(NUM_CLASSES), DetectionEvaluator(NUM_CLASSES)
    # a distributed sampler deals images round-robin and pads rank 1 with a repeat of image 0
    _feed(r0, data, ids[0::2])
    _feed(r1, data, [*ids[1::2], 0])
    reducer = _TwoRanks()
    other = r1.compute(reducer)  # in real DDP both ranks leave the sum with rank 0's values; here r1 sums first
    assert set(other) == set(expected) and all(v == 0.0 for v in other.values())
    assert r0.compute(reducer) == expected  # rank 0's scores plus the other rank's zeros: exact


def test_multi_rank_without_image_ids_is_an_error() -> None:
    data = _dataset(6, n_images=2)
    r0, r1 = DetectionEvaluator(NUM_CLASSES), DetectionEvaluator(NUM_CLASSES)
    for ev, i in ((r0, 0), (r1, 1)):
        gt, dt = data[i]
        det = Detections(
            torch.tensor(dt["boxes"]).reshape(-1, 4), torch.tensor(dt["scores"]), torch.tensor(dt["labels"])
        )
        ev.update(
            [det], {"boxes": torch.tensor(gt["boxes"]).reshape(1, -1, 4), "labels": torch.tensor(gt["labels"])[None]}
        )
    reducer = _TwoRanks()
    with pytest.raises(ValueError, match="image_ids"):  # every rank without ids fails, none waits in a collective
        r1.compute(reducer)
    with pytest.raises(ValueError, match="image_ids"):
        r0.compute(reducer)

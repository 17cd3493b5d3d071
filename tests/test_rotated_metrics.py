"""DOTA-style mAP: hand-built cases with known AP, an independent numpy + shapely port of DOTA_devkit's ``voc_eval``,
and exactness under a fake two-rank reducer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.errors import DataError
from kdforge.ops.rotated import rbox_to_poly
from kdforge.tasks.rotated_metrics import IOU_THRESHOLDS, OrientedEvaluator, voc_ap

shapely_geometry = pytest.importorskip("shapely.geometry")


def _targets(boxes, labels, difficult=None):
    t = {"rboxes": torch.tensor([boxes], dtype=torch.float64), "labels": torch.tensor([labels])}
    if difficult is not None:
        t["difficult"] = torch.tensor([difficult], dtype=torch.bool)
    return t


def _preds(boxes, scores, labels):
    return {
        "rboxes": torch.tensor([boxes], dtype=torch.float64).reshape(1, -1, 5),
        "scores": torch.tensor([scores], dtype=torch.float64).reshape(1, -1),
        "labels": torch.tensor([labels], dtype=torch.long).reshape(1, -1),
    }


G1 = [10.0, 10.0, 8.0, 4.0, 0.3]
G2 = [40.0, 30.0, 12.0, 5.0, -1.0]
FAR = [80.0, 80.0, 6.0, 3.0, 0.0]


def test_tp_fp_tp_curve_has_known_ap():
    ev = OrientedEvaluator(num_classes=1)
    ev.update(_preds([G1, FAR, G2], [0.9, 0.8, 0.7], [0, 0, 0]), _targets([G1, G2], [0, 0]))
    out = ev.compute()
    # recall .5 .5 1, precision 1 .5 2/3: all-point = .5·1 + .5·2/3; 11-point = (6·1 + 5·2/3) / 11
    assert out["mAP50"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert out["mAP50_07"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)
    assert out["AP50.0"] == out["mAP50"]
    assert out["mAP50:95"] == pytest.approx(out["mAP50"], abs=1e-12)  # the matches are exact at every threshold


def test_duplicate_is_fp_and_difficult_is_ignored():
    ev = OrientedEvaluator(num_classes=1)
    # a duplicate on G1 (FP), then a detection of the difficult G2 (neither TP nor FP)
    ev.update(_preds([G1, G2, G1], [0.9, 0.8, 0.7], [0, 0, 0]), _targets([G1, G2], [0, 0], [False, True]))
    out = ev.compute()
    # npos = 1; curve: (rec 1, prec 1), (ignored), (rec 1, prec .5) → AP 1 under both interpolations
    assert out["mAP50"] == pytest.approx(1.0)
    assert out["mAP50_07"] == pytest.approx(1.0)


def test_iou_exactly_at_threshold_is_not_a_match():
    gt = [0.0, 0.0, 2.0, 1.0, 0.0]
    det = [0.5, 0.0, 1.0, 1.0, 0.0]  # IoU = 1 / 2 exactly
    ev = OrientedEvaluator(num_classes=1)
    ev.update(_preds([det], [1.0], [0]), _targets([gt], [0]))
    assert ev.compute()["mAP50"] == 0.0


def test_voc07_thresholds_follow_np_arange_quirk():
    # 10 ground truths, 3 found with precision 1: recall reaches exactly 0.3, which is below np.arange's
    # 0.30000000000000004, so only t = 0, 0.1, 0.2 count (DOTA_devkit voc_ap with use_07_metric=True).
    rec = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    prec = torch.ones(3, dtype=torch.float64)
    assert float(voc_ap(rec, prec, True)) == pytest.approx(3 / 11, abs=1e-15)
    assert float(voc_ap(rec, prec, False)) == pytest.approx(0.3, abs=1e-15)


def test_wrong_class_is_fp_and_classes_without_gt_are_left_out():
    ev = OrientedEvaluator(num_classes=3, class_names=["plane", "ship", "car"])
    ev.update(_preds([G1, G2], [0.9, 0.8], [1, 0]), _targets([G1, G2], [0, 0]))
    out = ev.compute()
    assert out["AP50.plane"] == pytest.approx(0.5)  # G2 found, G1 only by a "ship" detection
    assert "AP50.ship" not in out and "AP50.car" not in out  # no ground truth: not averaged
    assert out["mAP50"] == pytest.approx(0.5)


def test_empty_and_list_inputs():
    ev = OrientedEvaluator(num_classes=2)
    assert ev.compute()["mAP50"] == 0.0
    ev.update(
        [{"rboxes": torch.tensor([G1]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}],
        {"rboxes": torch.tensor([[G1]]), "labels": torch.tensor([[1]])},
    )
    assert ev.compute()["mAP50"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="num_classes"):
        ev.update(_preds([G1], [0.5], [2]), _targets([G1], [0]))


# ---------------------------------------------------------------------------------------- independent reference
def _poly_iou(p, q):
    a, b = shapely_geometry.Polygon(p), shapely_geometry.Polygon(q)
    inter = a.intersection(b).area
    return inter / (a.area + b.area - inter)


def _ref_voc_ap(rec, prec, use_07):
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap += p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def _ref_map(images, num_classes, thr, use_07):
    """DOTA_devkit voc_eval, rewritten: per class, a result list image by image, a stable sort by score, the
    sequential greedy loop with polygon IoU from shapely."""
    aps = []
    for cls in range(num_classes):
        npos = sum(int(((im["gl"] == cls) & ~im["gd"]).sum()) for im in images)
        if npos == 0:
            continue
        dets = [
            (im_i, s, p)
            for im_i, im in enumerate(images)
            for s, p, lab in zip(im["ds"], im["dp"], im["dl"], strict=True)
            if lab == cls
        ]
        order = np.argsort(-np.array([d[1] for d in dets]), kind="stable")
        taken = {i: np.zeros(len(im["gl"]), bool) for i, im in enumerate(images)}
        tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
        for d, k in enumerate(order):
            im_i, _, poly = dets[k]
            im = images[im_i]
            idx = np.where(im["gl"] == cls)[0]
            ovmax, jmax = -np.inf, -1
            if idx.size:
                ious = [_poly_iou(poly, im["gp"][j]) for j in idx]
                ovmax, jmax = max(ious), idx[int(np.argmax(ious))]
            if ovmax > thr:
                if not im["gd"][jmax]:
                    if not taken[im_i][jmax]:
                        tp[d], taken[im_i][jmax] = 1, True
                    else:
                        fp[d] = 1
            else:
                fp[d] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps.append(_ref_voc_ap(rec, prec, use_07))
    return float(np.mean(aps))


def _random_split(seed, n_images=8, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n_images):
        m = int(torch.randint(0, 6, (1,), generator=g))
        gt = torch.cat(
            [
                torch.rand(m, 2, generator=g) * 100,
                6 + torch.rand(m, 2, generator=g) * 20,
                torch.rand(m, 1, generator=g) * 3.2 - 1.6,
            ],
            dim=1,
        ).double()
        gl = torch.randint(0, num_classes, (m,), generator=g)
        gd = torch.rand(m, generator=g) < 0.2
        hit = torch.rand(m, generator=g) < 0.8
        found, fl = gt[hit], gl[hit]
        jitter = torch.randn(found.shape, generator=g).double() * torch.tensor([1.5, 1.5, 1.5, 1.0, 0.15]).double()
        dupes = found[: len(found) // 2] + torch.randn(len(found) // 2, 5, generator=g).double() * 2
        noise = torch.cat(
            [
                torch.rand(3, 2, generator=g) * 100,
                6 + torch.rand(3, 2, generator=g) * 20,
                torch.rand(3, 1, generator=g) * 3 - 1.5,
            ],
            dim=1,
        ).double()
        dets = torch.cat([found + jitter, dupes, noise])
        dl = torch.cat([fl, fl[: len(found) // 2], torch.randint(0, num_classes, (3,), generator=g)])
        flip = torch.rand(len(dl), generator=g) < 0.1  # a few wrong labels
        dl = torch.where(flip, (dl + 1) % num_classes, dl)
        ds = torch.rand(len(dl), generator=g).double()
        images.append({"g": gt, "gl": gl, "gd": gd, "d": dets, "dl": dl, "ds": ds})
    return images


def _np_view(images):
    out = []
    for im in images:
        out.append(
            {
                "gl": im["gl"].numpy(),
                "gd": im["gd"].numpy(),
                "gp": rbox_to_poly(im["g"]).numpy(),
                "dl": im["dl"].numpy(),
                "ds": im["ds"].numpy(),
                "dp": rbox_to_poly(im["d"]).numpy(),
            }
        )
    return out


def _batches(images, size):
    for s in range(0, len(images), size):
        chunk = images[s : s + size]
        m = max(1, max(len(im["gl"]) for im in chunk))
        gt = torch.zeros(len(chunk), m, 5, dtype=torch.float64)
        gl = torch.full((len(chunk), m), -1)
        gd = torch.zeros(len(chunk), m, dtype=torch.bool)
        for i, im in enumerate(chunk):
            n = len(im["gl"])
            gt[i, :n], gl[i, :n], gd[i, :n] = im["g"], im["gl"], im["gd"]
        preds = [{"rboxes": im["d"], "scores": im["ds"], "labels": im["dl"]} for im in chunk]
        ids = torch.arange(s, s + len(chunk))
        yield preds, {"rboxes": gt, "labels": gl, "difficult": gd, "image_id": ids}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_devkit_port(seed):
    images = _random_split(seed)
    ev = OrientedEvaluator(num_classes=3)
    for preds, targets in _batches(images, 3):
        ev.update(preds, targets)
    out = ev.compute()
    ref = _np_view(images)
    assert out["mAP50_07"] == pytest.approx(_ref_map(ref, 3, 0.5, True), abs=1e-12)
    assert out["mAP50"] == pytest.approx(_ref_map(ref, 3, 0.5, False), abs=1e-12)
    assert out["mAP75"] == pytest.approx(_ref_map(ref, 3, 0.75, False), abs=1e-12)
    ref5095 = np.mean([_ref_map(ref, 3, t, False) for t in IOU_THRESHOLDS])
    assert out["mAP50:95"] == pytest.approx(ref5095, abs=1e-12)
    assert 0.0 < out["mAP50:95"] < out["mAP50"] < 1.0


class _Recorder:
    """Rank 1 of a fake two-rank run: remembers what its evaluator contributes to each collective."""

    def __init__(self):
        self.sums, self.objs = [], []

    def sum(self, tensor):
        self.sums.append(tensor.clone())
        return tensor

    def gather(self, obj):
        self.objs.append(obj)
        return None


class _Rank0:
    """Rank 0: sums its tensors with rank 1's and gathers [own, rank 1's]."""

    def __init__(self, other: _Recorder):
        self.other, self.i, self.j = other, 0, 0

    def sum(self, tensor):
        out = tensor + self.other.sums[self.i]
        self.i += 1
        return out

    def gather(self, obj):
        out = [obj, self.other.objs[self.j]]
        self.j += 1
        return out


@pytest.mark.parametrize("with_ids", [True, False])
def test_two_rank_reduction_is_exact(with_ids):
    images = _random_split(5, n_images=10)
    batches = list(_batches(images, 2))
    if with_ids:
        # tied scores across images: image_id decides their order in any split
        for preds, _ in batches:
            for p in preds:
                p["scores"] = torch.round(p["scores"] * 4) / 4
    else:
        for _, targets in batches:
            del targets["image_id"]
    single = OrientedEvaluator(num_classes=3)
    for preds, targets in batches:
        single.update(preds, targets)
    expected = single.compute()

    ranks = [OrientedEvaluator(num_classes=3), OrientedEvaluator(num_classes=3)]
    if with_ids:  # DistributedSampler-like interleaving
        for i, (preds, targets) in enumerate(batches):
            ranks[i % 2].update(preds, targets)
    else:  # contiguous halves keep the arrival order rank by rank
        half = len(batches) // 2
        for i, (preds, targets) in enumerate(batches):
            ranks[int(i >= half)].update(preds, targets)
    rec = _Recorder()
    # rank 1 contributes zeros to the final sum of rank 0's scores (a real sum then gives it rank 0's numbers:
    # tests/test_distributed.py checks every rank reads the same metrics)
    assert set(ranks[1].compute(rec).values()) == {0.0}
    assert ranks[0].compute(_Rank0(rec)) == expected
    assert math.isfinite(expected["mAP50"]) and expected["mAP50"] > 0


def test_class_names_must_match_num_classes():
    from kdforge.errors import ConfigError

    with pytest.raises(ConfigError, match="2 class names for 3 classes"):
        OrientedEvaluator(num_classes=3, class_names=["a", "b"])

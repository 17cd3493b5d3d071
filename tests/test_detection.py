"""Detection task: ATSS assignment, GFL losses (golden), prediction, model, end-to-end sanity, export and MACs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from kdforge.errors import ConfigError
from kdforge.losses.detection import (
    distribution_focal_loss,
    gfl_loss,
    giou_loss,
    integral,
    quality_focal_loss,
)
from kdforge.ops.assign import atss_assign, grid_points
from kdforge.tasks.detection import DetectionTask

# ---------------------------------------------------------------- ATSS


def _np_atss(points, strides, counts, gts, topk, scale):
    """Independent single-image ATSS (loops, float64) following the paper's algorithm 1."""
    n, m = len(points), len(gts)
    anchors = np.concatenate([points - strides[:, None] * scale / 2, points + strides[:, None] * scale / 2], 1)

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
        return iw * ih / u

    best = np.full(n, -np.inf)
    owner = np.full(n, -1)
    for g in range(m):
        c = ((gts[g, :2] + gts[g, 2:]) / 2)[None]
        d = np.sqrt(((points - c) ** 2).sum(1))
        cands, start = [], 0
        for cnt in counts:
            cands += list(start + np.argsort(d[start : start + cnt], kind="stable")[: min(topk, cnt)])
            start += cnt
        ious = np.array([iou(anchors[i], gts[g]) for i in cands])
        thr = ious.mean() + ious.std(ddof=1)
        for i, v in zip(cands, ious, strict=True):
            inside = min(points[i, 0] - gts[g, 0], points[i, 1] - gts[g, 1], gts[g, 2] - points[i, 0],
                         gts[g, 3] - points[i, 1]) > 0.01  # fmt: skip
            if v >= thr and inside and v > best[i]:
                best[i], owner[i] = v, g
    return owner


def test_atss_hand_built_four_points() -> None:
    # one 8x8 level of stride 4; the gt centre (16, 16) sits between points (14|18, 14|18): those 4 are the only
    # candidates at topk=4, all with the same anchor IoU (std 0 -> threshold = mean), all inside -> 4 positives
    points, strides, counts = grid_points([(8, 8)], (4,))
    gt = torch.tensor([[[8.0, 8.0, 24.0, 24.0], [8.0, 8.0, 24.0, 24.0]]])
    valid = torch.tensor([[True, False]])  # the second row is padding identical to the real gt
    idx, iou = atss_assign(points, strides, counts, gt, valid, topk=4, anchor_scale=4.0)
    pos = torch.nonzero(idx[0] >= 0).flatten().tolist()
    expected = sorted(int(y * 8 + x) for y in (3, 4) for x in (3, 4))
    assert pos == expected
    assert (idx[0, pos] == 0).all()  # padding never assigned
    assert iou[0, pos] == pytest.approx(torch.full((4,), 196 / 316))
    # topk = 2 among 4 equidistant points: the first two in point order, on any device
    idx, _ = atss_assign(points, strides, counts, gt, valid, topk=2, anchor_scale=4.0)
    assert torch.nonzero(idx[0] >= 0).flatten().tolist() == [27, 28]


def test_atss_padding_only_and_empty() -> None:
    points, strides, counts = grid_points([(4, 4), (2, 2)], (4, 8))
    gt = torch.tensor([[[0.0, 0.0, 16.0, 16.0]]])
    idx, iou = atss_assign(points, strides, counts, gt, torch.tensor([[False]]))
    assert (idx == -1).all() and (iou == 0).all()
    idx, _ = atss_assign(points, strides, counts, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert idx.shape == (2, 20) and (idx == -1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_atss_matches_reference_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes, strides_t = [(16, 16), (8, 8), (4, 4)], (4, 8, 16)
    points, strides, counts = grid_points(sizes, strides_t)
    b, m = 3, 5
    xy = rng.uniform(0, 50, size=(b, m, 2))
    gts = np.concatenate([xy, xy + rng.uniform(6, 40, size=(b, m, 2))], -1).astype(np.float32)
    valid = rng.random((b, m)) < 0.8
    valid[:, 0] = True
    idx, _ = atss_assign(points, strides, counts, torch.tensor(gts), torch.tensor(valid), topk=9, anchor_scale=4.0)
    for i in range(b):
        keep = np.flatnonzero(valid[i])
        ref = _np_atss(
            points.double().numpy(), strides.double().numpy(), counts, gts[i][keep].astype(np.float64), 9, 4.0
        )
        ref = np.where(ref >= 0, keep[np.maximum(ref, 0)], -1)
        assert idx[i].tolist() == ref.tolist()
        assert (idx[i] >= 0).sum() > 0


def test_task_assign_fields() -> None:
    task = DetectionTask(num_classes=3, reg_max=4)
    cls = [torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2)]
    reg = [torch.zeros(1, 20, 8, 8), torch.zeros(1, 20, 4, 4), torch.zeros(1, 20, 2, 2)]
    targets = {"boxes": torch.tensor([[[8.0, 8.0, 24.0, 24.0], [0, 0, 0, 0]]]), "labels": torch.tensor([[2, -1]])}
    a = task.assign((cls, reg), targets)
    assert a.pos_mask.sum() > 0
    assert (a.labels[a.pos_mask] == 2).all() and (a.labels[~a.pos_mask] == -1).all()
    assert torch.equal(a.box_targets[a.pos_mask][0], torch.tensor([8.0, 8.0, 24.0, 24.0]))
    # zero edge logits: uniform distributions, expected distance 2 bins; quality = IoU of that box with the gt
    flat = task.flatten((cls, reg))
    p = torch.nonzero(a.pos_mask[0]).flatten()[0]
    cx, cy = flat.points[p].tolist()
    d = 2 * flat.strides[p].item()
    box = [cx - d, cy - d, cx + d, cy + d]
    iw = max(0.0, min(box[2], 24) - max(box[0], 8))
    ih = max(0.0, min(box[3], 24) - max(box[1], 8))
    expected = iw * ih / ((2 * d) ** 2 + 256 - iw * ih)
    assert a.quality[0, p].item() == pytest.approx(expected, rel=1e-5)
    crowd = {**targets, "iscrowd": torch.tensor([[True, False]])}
    assert task.assign((cls, reg), crowd).pos_mask.sum() == 0  # crowd boxes are never positives


# ---------------------------------------------------------------- losses (golden)


def _bce(x: float, y: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_quality_focal_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 1.0], [-2.0, 0.5]])
    labels = torch.tensor([1, -1])
    quality = torch.tensor([0.5, 0.9])  # the background row's quality is ignored
    got = quality_focal_loss(logits, labels, quality)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    row0 = _bce(0.0, 0.0) * s(0.0) ** 2 + _bce(1.0, 0.5) * abs(0.5 - s(1.0)) ** 2
    row1 = _bce(-2.0, 0.0) * s(-2.0) ** 2 + _bce(0.5, 0.0) * s(0.5) ** 2
    assert got.tolist() == pytest.approx([row0, row1], rel=1e-6)


def test_quality_focal_loss_equals_reference_structure() -> None:
    # mmdet's quality_focal_loss: negatives' loss for every class, then the positive entries overwritten
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 4, generator=g)
    labels = torch.randint(-1, 4, (20,), generator=g)
    quality = torch.rand(20, generator=g)
    p = logits.sigmoid()
    ref = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * p.pow(2)
    for i in range(20):
        if labels[i] >= 0:
            k = labels[i]
            ref[i, k] = F.binary_cross_entropy_with_logits(logits[i, k], quality[i]) * (quality[i] - p[i, k]).abs() ** 2
    torch.testing.assert_close(quality_focal_loss(logits, labels, quality), ref.sum(1))


def test_distribution_focal_loss_hand_computed() -> None:
    got = distribution_focal_loss(torch.zeros(1, 3), torch.tensor([0.3]))
    assert got.item() == pytest.approx(math.log(3))
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    z = math.log(math.e + math.e**2 + 1)
    expected = 0.75 * (z - 2.0) + 0.25 * (z - 0.0)
    assert distribution_focal_loss(logits, torch.tensor([1.25])).item() == pytest.approx(expected, rel=1e-6)


def test_giou_loss_hand_computed_and_integral() -> None:
    got = giou_loss(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    assert got.item() == pytest.approx(1 - (1 / 7 - 2 / 9))
    assert integral(torch.zeros(5)).item() == pytest.approx(2.0)
    assert integral(torch.tensor([0.0, 100.0, 0.0])).item() == pytest.approx(1.0)


def test_gfl_loss_weights_and_normalisation() -> None:
    # mmdet GFLHead: QFL / num_pos; GIoU * w summed (avg_factor 1); DFL * w over 4 edges / 4; both / sum(w)
    cls = torch.tensor([[[0.0, 1.0], [-1.0, 0.0], [2.0, -2.0]]])
    labels = torch.tensor([[1, -1, 0]])
    quality = torch.tensor([[0.5, 0.0, 0.8]])
    pos = labels >= 0
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    tgt = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    edges = torch.zeros(2, 4, 3)
    edge_t = torch.full((2, 4), 0.3)
    w = torch.tensor([0.9, 0.6])
    out = gfl_loss(cls, labels, quality, pos, pred, tgt, edges, edge_t, w)
    qfl = quality_focal_loss(cls[0], labels[0], quality[0]).sum() / 2
    giou = (0.9 * (1 - (1 / 7 - 2 / 9)) + 0.6 * 0.0) / 1.5
    dfl = (0.9 * 4 * math.log(3) + 0.6 * 4 * math.log(3)) / 4 / 1.5
    assert out["loss_qfl"].item() == pytest.approx(qfl.item(), rel=1e-6)
    assert out["loss_giou"].item() == pytest.approx(2.0 * giou, rel=1e-6)
    assert out["loss_dfl"].item() == pytest.approx(0.25 * dfl, rel=1e-6)
    # sum(w) < 1 is clamped to 1 (mmdet: avg_factor.clamp_(min=1))
    small = gfl_loss(cls, labels, quality, pos, pred, tgt, edges, edge_t, w / 10)
    assert small["loss_giou"].item() == pytest.approx(2.0 * 0.09 * (1 - (1 / 7 - 2 / 9)), rel=1e-6)


# ---------------------------------------------------------------- task: loss, predict, model


def _synthetic_batch(n: int = 4, seed: int = 0, size: int = 96) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from kdforge.data import _embedded_arrays
    from kdforge.data.synth.detection import make_canvases

    d = _embedded_arrays()
    c = make_canvases(d.train_images[:200], d.train_labels[:200], n, seed, canvas_size=size, max_size=size // 2)
    images = torch.from_numpy(c.images).float() / 255
    return images, {"boxes": torch.from_numpy(c.boxes), "labels": torch.from_numpy(c.labels)}


def test_loss_reaches_every_parameter_and_handles_empty_images() -> None:
    task = DetectionTask(num_classes=10)
    model = task.build_model("gfl_resnet8")
    images, targets = _synthetic_batch(2, size=64)
    targets["labels"][1] = -1  # a background image
    losses = task.loss(model(images), targets)
    assert set(losses) == {"loss_qfl", "loss_giou", "loss_dfl"}
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    none = {"boxes": torch.zeros(2, 1, 4), "labels": torch.full((2, 1), -1)}
    empty = task.loss(model(images), none)
    assert empty["loss_giou"].item() == 0.0 and empty["loss_dfl"].item() == 0.0
    assert torch.isfinite(empty["loss_qfl"])
    no_rows = task.loss(model(images), {"boxes": torch.zeros(2, 0, 4), "labels": torch.zeros(2, 0, dtype=torch.long)})
    assert no_rows["loss_qfl"].item() == pytest.approx(empty["loss_qfl"].item())
    with pytest.raises(ValueError, match="strides"):
        DetectionTask(num_classes=10, strides=(8, 16)).loss(model(images), none)


def test_predict_decodes_thresholds_and_suppresses() -> None:
    task = DetectionTask(num_classes=4, reg_max=4, score_threshold=0.3, nms_threshold=0.5, max_per_image=2)
    cls = [torch.full((1, 4, 4, 4), -10.0), torch.full((1, 4, 2, 2), -10.0), torch.full((1, 4, 1, 1), -10.0)]
    reg = [torch.zeros(1, 20, 4, 4), torch.zeros(1, 20, 2, 2), torch.zeros(1, 20, 1, 1)]
    peak = torch.full((4, 5), -50.0)
    peak[:, 2] = 50.0  # every edge at 2 bins = 8 px on stride 4
    reg[0][0, :, 1, 1] = peak.flatten()  # point (6, 6) -> box (-2, -2, 14, 14), clipped to (0, 0, 14, 14)
    reg[0][0, :, 1, 2] = peak.flatten()  # point (10, 6) -> (2, -2, 18, 14), clipped (2, 0, 16, 14)
    cls[0][0, 3, 1, 1] = 3.0  # class 3, score 0.95
    cls[0][0, 3, 1, 2] = 2.0  # class 3, 0.88: IoU with the first = 168/224 = 0.75 > 0.5 -> suppressed
    cls[0][0, 1, 1, 2] = 1.0  # class 1, 0.73: other class, kept
    cls[0][0, 0, 0, 0] = 0.0  # class 0, 0.5 but the limit of 2 per image drops it
    cls[0][0, 2, 3, 3] = -1.0  # 0.27 < threshold
    det = task.predict((cls, reg), image_size=(16, 16))[0]
    assert det.labels.tolist() == [3, 1]
    assert det.scores.tolist() == pytest.approx(
        [torch.sigmoid(torch.tensor(3.0)).item(), torch.sigmoid(torch.tensor(1.0)).item()]
    )
    torch.testing.assert_close(det.boxes, torch.tensor([[0.0, 0.0, 14.0, 14.0], [2.0, 0.0, 16.0, 14.0]]))


def test_forward_features_equals_forward_and_strides() -> None:
    task = DetectionTask(num_classes=10)
    model = task.build_model("gfl_resnet8").eval()
    x = torch.randn(2, 3, 96, 96)
    cls, reg = model(x)
    f = model.forward_features(x)
    for a, b in zip(cls + reg, f.cls_scores + f.bbox_preds, strict=True):
        torch.testing.assert_close(a, b)
    assert [c.shape[-1] for c in cls] == [24, 12, 6]
    assert [t.shape[1] for t in f.feats] == [i.channels for i in model.feature_info] == [32, 32, 32]
    assert len(f.backbone_feats) == 4
    with pytest.raises(ConfigError, match="unknown detection model"):
        task.build_model("gfl_nope")


def test_deterministic_per_seed() -> None:
    task = DetectionTask(num_classes=10)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = task.build_model("gfl_resnet8")
        images, targets = _synthetic_batch(2)
        outs.append(sum(task.loss(model(images), targets).values()).item())
    assert outs[0] == outs[1]


def _train(arch: str, steps: int, n: int) -> list[float]:
    torch.manual_seed(0)
    task = DetectionTask(num_classes=10)
    model = task.build_model(arch)
    images, targets = _synthetic_batch(n, size=64)
    # Adam: plain SGD at a stable rate needs hundreds of steps to move GFL's 0.01-prior head
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(steps):
        loss = sum(task.loss(model(images), targets).values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        history.append(loss.item())
    return history


@pytest.mark.slow
def test_student_training_reduces_loss_without_nan() -> None:
    history = _train("gfl_resnet8", 25, 4)
    assert history[-1] < 0.7 * history[0]  # measured: 0.954 -> 0.444


@pytest.mark.slow
def test_teacher_sized_training_without_nan() -> None:
    history = _train("gfl_resnet32x4", 4, 2)
    assert all(math.isfinite(h) for h in history)


# ---------------------------------------------------------------- export and cost


def test_torchscript_trace_equals_eager() -> None:
    model = DetectionTask(num_classes=10).build_model("gfl_resnet8").eval()
    x = torch.randn(1, 3, 32, 32)
    traced = torch.jit.trace(model, x, check_trace=False)  # compared below on another batch instead
    y = torch.randn(2, 3, 32, 32)
    eager, scripted = model(y), traced(y)
    for a, b in zip(eager[0] + eager[1], scripted[0] + scripted[1], strict=True):
        torch.testing.assert_close(a, b)


def test_onnx_export_equals_eager(tmp_path) -> None:
    """kdforge's ONNX exporter on a detector: every head output of every level, a second batch size (dynamic axis),
    checked by onnx.checker and onnxruntime against eager PyTorch (runs under `make test-all`, which installs the
    onnx extra)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kdforge.export import export_onnx

    model = DetectionTask(num_classes=10).build_model("gfl_resnet8").eval()
    check = export_onnx(model, torch.randn(2, 3, 96, 96), tmp_path / "det.onnx", atol=1e-4)
    assert check["status"] == "ok" and check["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "det.onnx"))
    x = torch.randn(3, 3, 96, 96)
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    eager = model(x)
    assert len(outs) == len(eager[0]) + len(eager[1])
    for a, b in zip(eager[0] + eager[1], outs, strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b, atol=1e-4)


@pytest.mark.parametrize(
    "arch,macs,params",
    [
        ("gfl_resnet8", 168_493_824, 194_593),
        pytest.param("gfl_resnet32x4", 10_160_605_440, 8_386_289, marks=pytest.mark.slow),
    ],
)
def test_profile_counts_macs(arch: str, macs: int, params: int) -> None:
    from kdforge.profile import count_macs

    model = DetectionTask(num_classes=10).build_model(arch)
    assert sum(p.numel() for p in model.parameters()) == params
    assert count_macs(model, (1, 3, 96, 96)) == macs


def test_predict_feeds_the_evaluator() -> None:
    task = DetectionTask(num_classes=10, score_threshold=0.0, max_per_image=20)
    model = task.build_model("gfl_resnet8").eval()
    images, targets = _synthetic_batch(2, size=64)
    ev = task.evaluator()
    with torch.no_grad():
        dets = task.predict(model(images), image_size=(64, 64))
    assert all(len(d.boxes) == 20 for d in dets)  # no threshold: the 20-per-image cap binds
    assert all(torch.all(d.scores[:-1] >= d.scores[1:]) for d in dets)
    ev.update(dets, {**targets, "image_ids": torch.tensor([0, 1])})
    metrics = ev.compute()
    assert ev.primary in metrics and 0.0 <= metrics["AP"] <= 1.0 and len(metrics) == 12


def test_cifar_classifier_weights_load_into_the_backbone() -> None:
    from kdforge.models.cifar.resnet import CifarResNet

    clf = CifarResNet(8, [16, 16, 32, 64], num_classes=100)
    det = DetectionTask(num_classes=10).build_model("gfl_resnet8")
    state = {k: v for k, v in clf.state_dict().items() if not k.startswith("fc.")}
    det.backbone.load_state_dict(state, strict=True)
    torch.testing.assert_close(det.backbone.layer3[0].conv1.weight, clf.layer3[0].conv1.weight)

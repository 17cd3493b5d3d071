"""The oriented-detection task: box parametrisation, detectors, loss, predictions, metric, data, pictures, export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.data import build_data
from kdforge.data.dota import DOTA_V1_CLASSES
from kdforge.errors import ConfigError, DataError
from kdforge.losses.oriented import oriented_gfl_loss
from kdforge.models.dense.oriented import ORIENTED_MODELS, OrientedFeatures
from kdforge.ops.rotated import rbox_iou, rbox_to_poly, regularize_rboxes
from kdforge.registry import TASKS
from kdforge.tasks.oriented import (
    OrientedDetectionTask,
    OrientedFlatOutputs,
    angle_integral,
    angle_to_bins,
    distance_to_rbox,
    rbox_to_distance,
)

NUM_CLASSES = 3


def _task(**kw) -> OrientedDetectionTask:
    return TASKS.get("oriented_detection")(num_classes=NUM_CLASSES, reg_max=8, angle_bins=8, **kw)


def _targets() -> dict[str, torch.Tensor]:
    rboxes = torch.tensor(
        [
            [[20.0, 22.0, 30.0, 10.0, 0.3], [44.0, 40.0, 40.0, 14.0, -1.2], [0.0, 0.0, 0.0, 0.0, 0.0]],
            [[30.0, 30.0, 50.0, 16.0, 1.0], [12.0, 50.0, 16.0, 6.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
        ]
    )
    return {"rboxes": rboxes, "labels": torch.tensor([[1, 2, -1], [0, 1, -1]]), "image_id": torch.arange(2)}


# ---------------------------------------------------------------------------------------------- geometry


def test_distances_of_a_hand_built_box():
    # an axis-aligned 20 x 10 box at (5, 5): the point (3, 7) is 8 from the left side, 7 from the top
    box = torch.tensor([5.0, 5.0, 20.0, 10.0, 0.0])
    d = rbox_to_distance(torch.tensor([3.0, 7.0]), box)
    assert torch.allclose(d, torch.tensor([8.0, 7.0, 12.0, 3.0]))
    # turned by 45 degrees: a point 1 along the box's long axis from the centre is 1 closer to the right side
    t = math.pi / 4
    box = torch.tensor([0.0, 0.0, 6.0, 2.0, t])
    p = torch.tensor([math.cos(t), math.sin(t)])
    assert torch.allclose(rbox_to_distance(p, box), torch.tensor([4.0, 1.0, 2.0, 1.0]), atol=1e-6)
    assert torch.allclose(distance_to_rbox(p, torch.tensor([4.0, 1.0, 2.0, 1.0]), torch.tensor(t)), box, atol=1e-6)


def test_distance_round_trip_gives_the_le90_box():
    g = torch.Generator().manual_seed(0)
    n = 200
    boxes = torch.cat(
        [torch.rand(n, 2, generator=g) * 50, 5 + torch.rand(n, 2, generator=g) * 30, torch.rand(n, 1, generator=g)],
        dim=1,
    )
    boxes[:, 4] = (boxes[:, 4] - 0.5) * math.pi
    boxes = regularize_rboxes(boxes)
    local = (torch.rand(n, 2, generator=g) - 0.5) * boxes[:, 2:4] * 0.9  # points inside each box
    cos, sin = torch.cos(boxes[:, 4]), torch.sin(boxes[:, 4])
    points = boxes[:, :2] + torch.stack(
        [local[:, 0] * cos - local[:, 1] * sin, local[:, 0] * sin + local[:, 1] * cos], 1
    )
    d = rbox_to_distance(points, boxes)
    assert (d > 0).all()
    back = distance_to_rbox(points, d, boxes[:, 4])
    assert torch.allclose(back, boxes, atol=1e-4)
    # a box given with w < h comes back in le90 form: same rectangle (IoU 1), long side first
    swapped = distance_to_rbox(points[:1], d[:1][:, [1, 0, 3, 2]], boxes[:1, 4] + math.pi / 2)
    assert swapped[0, 2] >= swapped[0, 3]


def test_angle_bins_span_the_le90_range():
    bins = 8
    assert torch.allclose(
        angle_to_bins(torch.tensor([-math.pi / 2, 0.0, math.pi / 4]), bins), torch.tensor([0.0, 4, 6])
    )
    onehot = torch.full((bins + 1, bins + 1), -30.0).fill_diagonal_(30.0)
    expected = -math.pi / 2 + torch.arange(bins + 1) * math.pi / bins
    assert torch.allclose(angle_integral(onehot), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- models


def test_models_output_per_level_distributions_and_features_match():
    task = _task()
    assert task.model_names() == sorted(ORIENTED_MODELS)
    torch.manual_seed(0)
    m = task.build_model("ogfl_resnet8").eval()
    x = torch.randn(2, 3, 64, 64)
    cls, box, ang = m(x)
    assert [c.shape[-1] for c in cls] == [16, 8, 4]
    assert cls[0].shape == (2, NUM_CLASSES, 16, 16) and box[0].shape == (2, 4 * 9, 16, 16)
    assert ang[0].shape == (2, 9, 16, 16)
    feats = m.forward_features(x)
    assert isinstance(feats, OrientedFeatures) and len(feats.feats) == 3
    for a, b in zip((cls, box, ang), (feats.cls_scores, feats.bbox_preds, feats.angle_preds), strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    with pytest.raises(ConfigError, match="unknown oriented_detection model"):
        task.build_model("gfl_resnet8")
    with pytest.raises(ConfigError, match="angle_bins"):
        TASKS.get("oriented_detection")(num_classes=2, angle_bins=0)
    with pytest.raises(ConfigError, match="loss_weights"):
        TASKS.get("oriented_detection")(num_classes=2, loss_weights={"qfl": 1.0})


# ---------------------------------------------------------------------------------------------- loss


def test_every_gt_gets_positives_inside_its_rotated_box_and_quality_is_the_rotated_iou():
    task = _task()
    torch.manual_seed(0)
    m = task.build_model("ogfl_resnet8")
    targets = _targets()
    flat = task.flatten(m(torch.randn(2, 3, 64, 64)))
    a = task.assign(flat, targets)
    for i in range(2):
        assert set(a.gt_index[i][a.pos_mask[i]].tolist()) == {0, 1}
    pos = a.pos_mask
    points = flat.points[None].expand(2, -1, -1)[pos]
    assert (rbox_to_distance(points, a.box_targets[pos]) > 0).all()
    assert torch.allclose(a.quality[pos], rbox_iou(flat.decode()[pos], a.box_targets[pos]))
    assert (a.quality[~pos] == 0).all() and (a.labels[~pos] == -1).all()


def test_oriented_gfl_loss_against_an_independent_computation():
    shapely = pytest.importorskip("shapely.geometry")
    g = torch.Generator().manual_seed(1)
    b, n, c, p = 2, 5, 3, 3
    cls = torch.randn(b, n, c, generator=g)
    pos = torch.zeros(b, n, dtype=torch.bool)
    pos[0, 1] = pos[0, 3] = pos[1, 0] = True
    labels = torch.full((b, n), -1)
    labels[pos] = torch.tensor([2, 0, 1])
    quality = torch.zeros(b, n)
    quality[pos] = torch.tensor([0.5, 0.8, 0.3])
    pred = torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.2], [1.0, 1.0, 3.0, 1.0, -0.5], [2.0, 0.0, 5.0, 2.0, 1.0]])
    target = torch.tensor([[0.5, 0.0, 4.0, 2.0, 0.0], [1.0, 1.5, 3.0, 1.5, -0.4], [2.0, 0.0, 5.0, 2.0, 1.3]])
    edges = torch.randn(p, 4, 9, generator=g)
    edge_t = torch.rand(p, 4, generator=g) * 7.9
    angles = torch.randn(p, 9, generator=g)
    angle_t = torch.rand(p, generator=g) * 7.99
    weight = torch.tensor([0.3, 0.9, 0.6])
    weights = {"qfl": 1.0, "iou": 2.0, "dfl": 0.25, "angle": 0.5}
    got = oriented_gfl_loss(cls, labels, quality, pos, pred, target, edges, edge_t, angles, angle_t, weight, weights)

    def sig(x):
        return 1 / (1 + np.exp(-x))

    x = cls.double().numpy().reshape(-1, c)
    y = np.zeros_like(x)
    for row, (lab, q) in enumerate(zip(labels.flatten().tolist(), quality.flatten().tolist(), strict=True)):
        if lab >= 0:
            y[row, lab] = q
    s = sig(x)
    bce = -(y * np.log(s) + (1 - y) * np.log(1 - s))
    qfl = (bce * np.abs(y - s) ** 2).sum() / 3

    def poly(r):
        return shapely.Polygon(rbox_to_poly(torch.tensor(r, dtype=torch.float64)).tolist())

    ious = [
        poly(a).intersection(poly(t)).area / poly(a).union(poly(t)).area
        for a, t in zip(pred.tolist(), target.tolist(), strict=True)
    ]
    w = weight.double().numpy()
    iou = ((1 - np.array(ious)) * w).sum() / w.sum()

    def dfl(logits, t):
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        lo = np.floor(t).astype(int)
        return -(lp[np.arange(len(t)), lo] * (lo + 1 - t) + lp[np.arange(len(t)), lo + 1] * (t - lo))

    e = dfl(edges.double().numpy().reshape(-1, 9), edge_t.double().numpy().reshape(-1)).reshape(p, 4)
    d = (e * w[:, None]).sum() / 4 / w.sum()
    ang = (dfl(angles.double().numpy(), angle_t.double().numpy()) * w).sum() / w.sum()
    assert got["loss_qfl"].item() == pytest.approx(qfl, rel=1e-5)
    assert got["loss_iou"].item() == pytest.approx(2 * iou, rel=1e-5)
    assert got["loss_dfl"].item() == pytest.approx(0.25 * d, rel=1e-5)
    assert got["loss_angle"].item() == pytest.approx(0.5 * ang, rel=1e-5)


def test_task_loss_is_finite_and_reaches_every_parameter_even_without_objects():
    task = _task()
    torch.manual_seed(0)
    m = task.build_model("ogfl_resnet8")
    parts = task.loss(task.train_outputs(m, torch.randn(2, 3, 64, 64)), _targets())
    assert set(parts) == {"loss_qfl", "loss_iou", "loss_dfl", "loss_angle"}
    sum(parts.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    empty = {"rboxes": torch.zeros(2, 0, 5), "labels": torch.zeros(2, 0, dtype=torch.long)}
    parts = task.loss(m(torch.randn(2, 3, 64, 64)), empty)
    assert all(torch.isfinite(v) for v in parts.values()) and parts["loss_iou"] == 0


# ---------------------------------------------------------------------------------------------- predict + metric


def _planted_outputs(task: OrientedDetectionTask, box: torch.Tensor, label: int) -> OrientedFlatOutputs:
    """Head outputs (64 x 64 input) whose points near ``box``'s centre all predict it with class ``label``."""
    sizes = [(16, 16), (8, 8), (4, 4)]
    cls = [torch.full((1, NUM_CLASSES, h, w), -10.0) for h, w in sizes]
    box_maps = [torch.zeros(1, 4 * 9, h, w) for h, w in sizes]
    ang_maps = [torch.zeros(1, 9, h, w) for h, w in sizes]
    for level, ((h, w), s) in enumerate(zip(sizes, (4, 8, 16), strict=True)):
        for i in range(h):
            for j in range(w):
                p = torch.tensor([(j + 0.5) * s, (i + 0.5) * s])
                if level != 0 or (p - box[:2]).norm() > 3.0:
                    continue
                cls[level][0, label, i, j] = 3.0 - (p - box[:2]).norm()
                d = rbox_to_distance(p, box) / s
                for k in range(4):  # two bins around the distance, weighted so the expectation is exact
                    lo = int(d[k])
                    frac = float(d[k] - lo)
                    logits = torch.full((9,), -40.0)
                    logits[lo], logits[lo + 1] = math.log(1 - frac + 1e-12), math.log(frac + 1e-12)
                    box_maps[level][0, k * 9 : (k + 1) * 9, i, j] = logits
                t = float(angle_to_bins(box[4], 8))
                lo, frac = int(t), t - int(t)
                logits = torch.full((9,), -40.0)
                logits[lo], logits[lo + 1] = math.log(1 - frac + 1e-12), math.log(frac + 1e-12)
                ang_maps[level][0, :, i, j] = logits
    return tuple(cls), tuple(box_maps), tuple(ang_maps)


def test_predict_decodes_the_planted_box_and_nms_keeps_one():
    task = _task()
    box = torch.tensor([30.0, 34.0, 28.0, 8.0, 0.6])
    dets = task.predict(_planted_outputs(task, box, label=2))
    assert len(dets) == 1 and dets[0]["labels"].tolist() == [2]
    assert torch.allclose(dets[0]["rboxes"][0], box, atol=1e-3)
    ev = task.evaluator()
    assert ev.primary == "mAP50"
    ev.update(dets, {"rboxes": box.view(1, 1, 5), "labels": torch.tensor([[2]]), "image_id": torch.tensor([0])})
    got = ev.compute()
    assert got["mAP50"] == pytest.approx(1.0) and got["mAP50_07"] == pytest.approx(1.0)
    assert set(task.summary_metrics) <= set(got)


# ---------------------------------------------------------------------------------------------- data


def test_cifar10_obb_batches_are_deterministic_and_in_the_task_format():
    a = build_data("cifar10_obb", batch_size=4, eval_batch_size=4, train_subset=8, test_subset=4, seed=2)
    b = build_data("cifar10_obb", batch_size=4, eval_batch_size=4, train_subset=8, test_subset=4, seed=2)
    assert a.num_classes == 10 and a.image_size == 96 and len(a.train) == 2
    ba, bb = next(iter(a.train)), next(iter(b.train))
    assert torch.equal(ba.input, bb.input) and all(torch.equal(ba.targets[k], bb.targets[k]) for k in ba.targets)
    assert set(ba.targets) == {"rboxes", "labels", "image_id"} and ba.targets["rboxes"].shape[-1] == 5
    valid = ba.targets["labels"] >= 0
    rb = ba.targets["rboxes"][valid]
    assert (rb[:, 2] >= rb[:, 3]).all() and (rb[:, 4] >= -math.pi / 2).all() and (rb[:, 4] < math.pi / 2).all()
    corners = rbox_to_poly(rb)
    assert (corners >= -1e-3).all() and (corners <= 96 + 1e-3).all()
    test = next(iter(a.test))
    assert torch.equal(test.targets["image_id"], torch.arange(4))
    with pytest.raises(DataError, match="multiple of 16"):
        build_data("cifar10_obb", batch_size=4, eval_batch_size=4, train_subset=4, test_subset=4, image_size=90)


def _dota_split(root: Path, names: list[str], objects: list[str]) -> None:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    for k, name in enumerate(names):
        Image.fromarray(np.full((100, 200, 3), 40 * k, dtype=np.uint8)).save(root / "images" / f"{name}.png")
        (root / "labelTxt" / f"{name}.txt").write_text("imagesource:GoogleEarth\ngsd:0.1\n" + objects[k])


def test_dota_folder_is_letterboxed_with_scaled_boxes_and_difficult_flags(tmp_path):
    _dota_split(
        tmp_path / "train",
        ["P0001", "P0002"],
        ["10 10 50 10 50 30 10 30 plane 0\n", "100 20 140 20 140 80 100 80 ship 1\n20 20 30 20 30 30 20 30 plane 0\n"],
    )
    _dota_split(tmp_path / "val", ["P0003"], ["0 0 40 0 40 20 0 20 ship 1\n"])
    d = build_data("dota", root=str(tmp_path), batch_size=2, eval_batch_size=1, image_size=64, augment=False)
    assert d.classes == list(DOTA_V1_CLASSES) and d.num_classes == 15 and d.image_size == 64
    batch = next(iter(d.test))
    assert batch.input.shape == (1, 3, 64, 64)
    scale = 64 / 200
    t = batch.targets
    assert t["labels"].tolist() == [[DOTA_V1_CLASSES.index("ship")]] and t["difficult"].tolist() == [[True]]
    assert torch.allclose(t["rboxes"][0, 0], torch.tensor([20 * scale, 10 * scale, 40 * scale, 20 * scale, 0.0]))
    train = next(iter(d.train))
    assert train.targets["rboxes"].shape == (2, 2, 5)
    with pytest.raises(DataError, match="needs data.root"):
        build_data("dota", batch_size=2, eval_batch_size=2)


# ---------------------------------------------------------------------------------------------- pictures, export


def test_pictures_draw_rotated_boxes(tmp_path):
    from kdforge.report.detection_pictures import draw_oriented_detections

    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    det = {
        "rboxes": torch.tensor([[32.0, 32.0, 40.0, 16.0, 0.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }
    gt = torch.tensor([[50.0, 54.0, 10.0, 4.0, math.pi / 4]])
    pic = np.asarray(draw_oriented_detections(image, det, ["a", "b"], gt, scale=1))
    assert tuple(pic[24, 40]) == (255, 127, 14)  # the top side of the predicted box, in class 1's colour
    assert tuple(pic[38, 45]) == (0, 0, 0)  # inside the box, below its label: nothing drawn
    white = np.argwhere((pic == 255).all(axis=-1))  # the gt polygon: pixels along its turned sides only
    assert len(white) > 10 and not ((white[:, 0] == white[0, 0]).all() or (white[:, 1] == white[0, 1]).all())


def test_oriented_student_exports_to_torchscript(tmp_path):
    from kdforge.export import export_torchscript

    torch.manual_seed(0)
    model = _task().build_model("ogfl_resnet8").eval()
    example = torch.randn(2, 3, 64, 64)
    check = export_torchscript(model, example, tmp_path / "student.pt", atol=1e-4)
    assert check["status"] == "ok" and check["max_abs_diff"] <= 1e-4
    loaded = torch.jit.load(str(tmp_path / "student.pt"))
    out = loaded(example)
    assert len(out) == 3 and all(
        torch.allclose(a, b, atol=1e-4) for a, b in zip(out[2], model(example)[2], strict=True)
    )


def test_onnx_export_equals_eager(tmp_path) -> None:
    """kdforge's ONNX exporter on an oriented detector (classification, box and angle distributions per level), at
    two batch sizes, against eager PyTorch (runs under `make test-all`, which installs the onnx extra)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kdforge.export import export_onnx

    model = _task().build_model("ogfl_resnet8").eval()
    check = export_onnx(model, torch.randn(2, 3, 64, 64), tmp_path / "oriented.onnx", atol=1e-4)
    assert check["status"] == "ok" and check["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "oriented.onnx"))
    x = torch.randn(3, 3, 64, 64)
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    eager = model(x)
    assert len(outs) == len(eager[0]) + len(eager[1]) + len(eager[2])
    for a, b in zip(eager[0] + eager[1] + eager[2], outs, strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b, atol=1e-4)


@pytest.mark.slow
def test_the_detector_overfits_four_canvases():
    """The whole chain (targets, loss, decoding, rotated NMS, mAP) agrees: 120 SGD steps on 4 cifar10_obb canvases
    and the detector finds their objects (measured 2026-11-28: mAP50 0.8 after 156 steps)."""
    torch.manual_seed(0)
    d = build_data("cifar10_obb", batch_size=4, eval_batch_size=4, train_subset=4, test_subset=4, augment=False)
    batch = next(iter(d.train))
    task = TASKS.get("oriented_detection")(num_classes=10)
    model = task.build_model("ogfl_resnet8")
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    first = None
    for _ in range(120):
        loss = sum(task.loss(task.train_outputs(model, batch.input), batch.targets).values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    model.eval()
    with torch.no_grad():
        preds = task.predict(model(batch.input))
    ev = task.evaluator()
    ev.update(preds, batch.targets)
    assert ev.compute()["mAP50"] > 0.5
